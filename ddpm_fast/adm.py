"""The ADM U-Net of improved DDPM and guided diffusion (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).

Structure, for L = len(channel_mult) levels, level i with ch_i = int(channel_mult[i] * model_channels)
channels, working at ds = 2**i times below the input resolution:

    t -> [t * 1000 / T if rescale_timesteps] -> sinusoid(model_channels) -> Linear -> SiLU -> Linear = emb
    emb += label_emb(y)                                                   (class-conditional models)
    x -> conv -> [level i: num_res_blocks x (ResBlock [+ Attn]), then Down unless last]
      -> middle: ResBlock, Attn, ResBlock
      -> [level i reversed: (num_res_blocks + 1) x (cat skip, ResBlock [+ Attn]), then Up unless first]
      -> GroupNorm -> SiLU -> conv                                        (2C channels with a learned sigma)

    ResBlock(x, emb) = skip(r(x)) + conv(dropout(SiLU(N(conv(r(SiLU(GN(x)))), emb))))
        N(h, emb)    = GN(h) * (1 + scale) + shift, [scale, shift] = Linear(SiLU(emb))  (use_scale_shift_norm)
                     = GN(h + Linear(SiLU(emb)))                                         (otherwise)
        r            = identity; x2 nearest up / 2x2 average pool in the up/down blocks of resblock_updown
    Attn(x)          = x + proj(softmax(q k^T / sqrt(d)) v) per head, [q, k, v] = qkv(GN(x))
    Down / Up        = a stride-2 3x3 conv / x2 nearest then a 3x3 conv, or a ResBlock (resblock_updown)

Attention sits at the levels whose resolution (image_size / ds) is listed in `attention_resolutions`, in
the middle block always. Heads: `num_head_channels` channels each, or `num_heads` of them
(`num_heads_upsample` in the decoder). The fused qkv projection orders its 3C output channels per head
([head][q|k|v][d], openai's QKVAttentionLegacy, improved-diffusion's only order) or per tensor
([q|k|v][head][d], `use_new_attention_order`). Every GroupNorm has 32 groups and computes in float32.

The module tree repeats openai's `UNetModel` (`input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`,
`in_layers.2`, `emb_layers.1`, `out_layers.3`, `skip_connection`, `qkv`, `proj_out`, `op`, `conv`, `out.2`,
`time_embed.0`, `label_emb`), so their state dicts load 1:1 (`ddpm_fast.adm_io`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_fast.attention import attention
from ddpm_fast.checks import check_int, is_int
from ddpm_fast.defaults import ConfigRecord, ModelDefaults
from ddpm_fast.errors import BadType, BadValue

__all__ = [
    "ADMConfig",
    "ADM",
    "ClassifierConfig",
    "ADMClassifier",
    "CHANNEL_MULT",
    "POOLS",
    "timestep_embedding",
]

GROUPS = 32  # every GroupNorm of the ADM U-Net (openai's `normalization`)

# The channel_mult both repositories pick when the flags leave it out (guided-diffusion knows 64-512,
# improved-diffusion 32, 64 and 256; where both know a size they agree).
CHANNEL_MULT = {
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
    512: (0.5, 1, 1, 2, 2, 4, 4),
}


@dataclass(frozen=True)
class ADMConfig(ConfigRecord):
    """Every knob of openai's UNetModel that a published checkpoint sets, under the flags' names."""

    image_size: int = 64  # the training resolution; any multiple of 2**(levels-1) runs
    in_channels: int = 3
    model_channels: int = 128  # --num_channels
    out_channels: int = 3  # 2 * in_channels with a learned sigma (--learn_sigma True)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)  # in pixels at image_size, as the flag lists them
    channel_mult: tuple[float, ...] | None = None  # None: CHANNEL_MULT[image_size]
    dropout: float = 0.0
    num_classes: int | None = None  # --class_cond True: 1000
    num_heads: int = 1
    num_head_channels: int | None = None  # set: heads of this width, num_heads ignored
    num_heads_upsample: int | None = None  # None: num_heads (decoder attention only)
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    rescale_timesteps: bool = False  # improved-diffusion: the model sees t * 1000 / num_timesteps
    num_timesteps: int = 1000  # the training --diffusion_steps (read only with rescale_timesteps)

    def __post_init__(self):
        # Lists from JSON become tuples so configs compare and hash.
        res = self.attention_resolutions
        object.__setattr__(self, "attention_resolutions", tuple(sorted(set(res), reverse=True)))
        if self.channel_mult is None:
            if self.image_size not in CHANNEL_MULT:
                raise BadValue(
                    f"ADMConfig.channel_mult has no default for image_size {self.image_size} (only "
                    f"{sorted(CHANNEL_MULT)}); give channel_mult"
                )
            object.__setattr__(self, "channel_mult", CHANNEL_MULT[self.image_size])
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        self._validate()

    def _validate(self):
        def pos_int(name):
            check_int(getattr(self, name), f"ADMConfig.{name}")

        for name in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks"):
            pos_int(name)
        pos_int("num_timesteps")
        for name in ("num_classes", "num_head_channels", "num_heads_upsample"):
            if getattr(self, name) is not None:
                pos_int(name)
        pos_int("num_heads")
        for name in (
            "use_scale_shift_norm",
            "resblock_updown",
            "use_new_attention_order",
            "rescale_timesteps",
        ):
            if not isinstance(getattr(self, name), bool):
                raise BadValue(f"ADMConfig.{name} must be a bool; got {getattr(self, name)!r}")
        mult = self.channel_mult
        if not mult or any(isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 for m in mult):
            raise BadValue(f"ADMConfig.channel_mult must be positive numbers; got {mult!r}")
        for c in self.level_channels:
            if c < 1 or c % GROUPS:
                raise BadValue(
                    f"ADMConfig.model_channels ({self.model_channels}) times channel_mult {mult} must give "
                    f"multiples of {GROUPS} channels (the GroupNorm groups); got {c}"
                )
        L = self.num_levels
        if self.image_size % (2 ** (L - 1)):
            raise BadValue(
                f"ADMConfig.image_size must be a multiple of 2**(levels-1) = {2 ** (L - 1)}; got {self.image_size}"
            )
        sizes = [self.image_size >> i for i in range(L)]
        for r in self.attention_resolutions:
            if not is_int(r) or r not in sizes:
                raise BadValue(
                    f"ADMConfig.attention_resolutions must be resolutions of the levels {sizes}; got {r!r}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise BadValue(f"ADMConfig.dropout must lie in [0, 1); got {self.dropout!r}")
        # Every attention block's channels must split into whole heads.
        chans = self.level_channels
        for c in [c for i, c in enumerate(chans) if self.attends(i)] + [chans[-1]]:
            if self.num_head_channels is not None:
                if c % self.num_head_channels:
                    raise BadValue(
                        f"ADMConfig.num_head_channels ({self.num_head_channels}) must divide attention channels {c}"
                    )
                continue
            for name in ("num_heads", "num_heads_upsample"):
                n = getattr(self, name)
                if n is not None and c % n:
                    raise BadValue(f"ADMConfig.{name} ({n}) must divide attention channels {c}")

    # ------------------------------------------------------------------ derived
    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(int(m * self.model_channels) for m in self.channel_mult)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model was built for."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def temb_dim(self) -> int:
        return 4 * self.model_channels

    def attends(self, level: int) -> bool:
        return (self.image_size >> level) in self.attention_resolutions

    def heads(self, channels: int, decoder: bool = False) -> int:
        if self.num_head_channels is not None:
            return channels // self.num_head_channels
        return (self.num_heads_upsample or self.num_heads) if decoder else self.num_heads

    # ------------------------------------------------------------------ presets
    # The published checkpoints' configs are built from their README flags: ddpm_fast.adm_io.PRESETS.
    @classmethod
    def tiny(cls, **overrides) -> ADMConfig:
        """3x16x16, two levels of 32 and 64 channels, attention at 8x8: for tests (0.7M parameters)."""
        cfg = cls(
            image_size=16,
            model_channels=32,
            num_res_blocks=1,
            channel_mult=(1, 2),
            attention_resolutions=(8,),
        )
        return cfg.replace(**overrides)


# ---------------------------------------------------------------------------------------------- layers


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t w_i), sin(t w_i)], w_i = 10000^(-i / (dim/2)), i < dim/2; float32, [B, dim]; t may be fractional.

    The same numbers as ddpm_fast.unet.timestep_embedding(t, dim, freq_shift=0, flip_sin_to_cos=True) (tested);
    written here because the layers contract keeps the two model files independent of each other.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32, returned in the input's dtype (openai's fp16 models do so)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        w, b = self.weight.to(dt), self.bias.to(dt)
        return F.group_norm(x.to(dt), self.num_groups, w, b, self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(GROUPS, channels)


def _resample(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    if kind == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if kind == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


class ResBlock(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        temb: int,
        dropout: float,
        scale_shift: bool,
        resample: str | None = None,  # "up" / "down": resblock_updown's resampling block
    ):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(temb, 2 * cout if scale_shift else cout))
        self.out_layers = nn.Sequential(
            _norm(cout), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        self.scale_shift = scale_shift
        self.resample = resample

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm1, act1, conv1 = self.in_layers
        norm2, act2, dropout, conv2 = self.out_layers
        h = conv1(_resample(act1(norm1(x)), self.resample))
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + e)
        h = conv2(dropout(act2(h)))
        return self.skip_connection(_resample(x, self.resample)) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, heads: int, new_order: bool):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.heads = heads
        self.new_order = new_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W)
        h = self.proj_out(qkv_attention(self.qkv(self.norm(x)), self.heads, self.new_order))
        return (x + h).reshape(B, C, H, W)


def qkv_attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """softmax(q^T k / sqrt(d)) v per head: qkv [B, 3C, T] -> [B, C, T]; qkv's channels ordered
    [head][q|k|v][d] (openai's QKVAttentionLegacy) or [q|k|v][head][d] (QKVAttention, new_order)."""
    B, C3, T = qkv.shape
    d = C3 // (3 * heads)
    if new_order:
        q, k, v = qkv.reshape(B, 3, heads, d, T).unbind(1)
    else:
        q, k, v = qkv.reshape(B, heads, 3, d, T).unbind(2)
    # [B, heads, d, T] -> [B, heads, T, d]. SDPA keeps the logits and softmax in float32 for fp16/bf16
    # inputs (the fused kernels accumulate in float32, the math one upcasts), as openai's
    # softmax(weight.float()) does; the float32 result differs from their einsums by rounding only.
    a = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return a.transpose(-1, -2).reshape(B, heads * d, T)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Block(nn.Sequential):
    """One entry of input_blocks / output_blocks: layers applied in turn, the ResBlocks given emb."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


def _encoder(c: ADMConfig, res, attn) -> tuple[nn.ModuleList, list[int]]:
    """The input_blocks of openai's UNetModel and EncoderUNetModel, and each block's output channels."""
    chans = c.level_channels
    blocks = nn.ModuleList([Block(nn.Conv2d(c.in_channels, chans[0], 3, padding=1))])
    skips = [chans[0]]
    ch = chans[0]
    for level, cout in enumerate(chans):
        for _ in range(c.num_res_blocks):
            layers = [res(ch, cout)]
            ch = cout
            if c.attends(level):
                layers.append(attn(ch))
            blocks.append(Block(*layers))
            skips.append(ch)
        if level < c.num_levels - 1:
            blocks.append(Block(res(ch, ch, "down") if c.resblock_updown else Downsample(ch)))
            skips.append(ch)
    return blocks, skips


# ---------------------------------------------------------------------------------------------- model


class ADM(nn.Module):
    """eps (or [eps, v] for 2C outputs) = ADM(config)(x [B,C,H,W], t [B] or [] int64, y [B] int64 labels)."""

    def __init__(self, config: ADMConfig):
        super().__init__()
        if not isinstance(config, ADMConfig):
            raise BadType(f"config must be an ADMConfig; got {type(config).__name__}")
        self.config = c = config
        # How to sample it (ddpm_fast.defaults); ddpm_fast.adm_io sets the checkpoint's own. openai's
        # default variance without a learned sigma is beta_t (their sigma_small=False).
        learned = c.out_channels == 2 * c.in_channels
        self.defaults = ModelDefaults(
            variance="learned_range" if learned else "fixed_large",
            image_shape=tuple(c.image_shape),
            num_classes=c.num_classes,
            arch="adm",
        )
        td, dp, ss, nrb = c.temb_dim, c.dropout, c.use_scale_shift_norm, c.num_res_blocks
        chans = c.level_channels

        def res(cin, cout, resample=None):
            return ResBlock(cin, cout, td, dp, ss, resample)

        def attn(ch, decoder=False):
            return AttentionBlock(ch, c.heads(ch, decoder), c.use_new_attention_order)

        mc = c.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, td), nn.SiLU(), nn.Linear(td, td))
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, td)

        self.input_blocks, skips = _encoder(c, res, attn)
        ch = skips[-1]

        self.middle_block = Block(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(c.num_levels)):
            cout = chans[level]
            for i in range(nrb + 1):
                layers = [res(ch + skips.pop(), cout)]
                ch = cout
                if c.attends(level):
                    layers.append(attn(ch, decoder=True))
                if level > 0 and i == nrb:
                    layers.append(res(ch, ch, "up") if c.resblock_updown else Upsample(ch))
                self.output_blocks.append(Block(*layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

    @property
    def schedule(self):
        """The training schedule of the model's record (`self.defaults.schedule`); assignable."""
        return self.defaults.schedule

    @schedule.setter
    def schedule(self, value) -> None:
        self.defaults = self.defaults.replace(schedule=value)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise BadValue(f"x must be [B, {c.in_channels}, H, W]; got shape {tuple(x.shape)}")
        m = 2 ** (c.num_levels - 1)
        if x.shape[-2] % m or x.shape[-1] % m:
            raise BadValue(f"x's height and width must be multiples of {m}; got shape {tuple(x.shape)}")
        B = x.shape[0]
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, device=x.device)
        t = t.reshape(-1).expand(B)  # a 0-d or 1-element t is shared by the whole batch
        if c.rescale_timesteps:
            t = t.float() * (1000.0 / c.num_timesteps)  # improved-diffusion's _WrappedModel, same rounding

        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(self.time_embed[0].weight.dtype))
        if c.num_classes is None:
            if y is not None:
                raise BadValue("y must be None: the model is not class-conditional")
        else:
            if not isinstance(y, torch.Tensor) or y.shape != (B,) or y.dtype.is_floating_point:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else y
                raise BadValue(
                    f"y must be an int tensor of {B} class labels in [0, {c.num_classes}) (the model is "
                    f"class-conditional); got {got!r}"
                )
            emb = emb + self.label_emb(y)

        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------- classifier

POOLS = ("attention", "adaptive")  # the published classifiers pool with attention


@dataclass(frozen=True)
class ClassifierConfig(ConfigRecord):
    """guided-diffusion's noisy classifier (EncoderUNetModel as their create_classifier builds it), under the
    names of its --classifier_* flags: width = model channels, depth = residual blocks per level."""

    image_size: int = 64  # the attention pool's positional embedding fixes the input size
    in_channels: int = 3
    width: int = 128
    depth: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # in pixels at image_size
    channel_mult: tuple[float, ...] | None = None  # None: CHANNEL_MULT[image_size], as create_classifier
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    pool: str = "attention"
    num_classes: int = 1000
    num_head_channels: int = 64  # create_classifier's, for the blocks and the pool

    def __post_init__(self):
        object.__setattr__(
            self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True))
        )
        if self.channel_mult is not None:
            object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if self.pool not in POOLS:
            raise BadValue(f"ClassifierConfig.pool must be one of {POOLS}; got {self.pool!r}")
        _ = self.trunk  # validates the shared fields (errors name ADMConfig's field names)

    @property
    def trunk(self) -> ADMConfig:
        """The encoder's ADMConfig: model_channels = width, num_res_blocks = depth, out_channels = classes."""
        return ADMConfig(
            image_size=self.image_size,
            in_channels=self.in_channels,
            model_channels=self.width,
            out_channels=self.num_classes,
            num_res_blocks=self.depth,
            attention_resolutions=self.attention_resolutions,
            channel_mult=self.channel_mult,
            num_head_channels=self.num_head_channels,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
        )


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling (guided-diffusion's): the mean token joins the HW tokens, a positional embedding
    is added, one multi-head attention layer ([q|k|v][head][d] order), the mean token's output projected."""

    def __init__(self, spatial: int, channels: int, head_channels: int, out: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out, 1)
        self.heads = channels // head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        x = x.reshape(B, C, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        return self.c_proj(qkv_attention(self.qkv_proj(x), self.heads, new_order=True))[:, :, 0]


class ADMClassifier(nn.Module):
    """logits [B, K] = ADMClassifier(config)(x [B, C, S, S], t [B] int64): ADM's encoder and middle block, then
    GroupNorm, SiLU and a pool (attention: AttentionPool2d; adaptive: mean, then a 1x1 conv). The module tree
    repeats openai's EncoderUNetModel (`input_blocks`, `middle_block`, `out.2.qkv_proj`, ...)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise BadType(f"config must be a ClassifierConfig; got {type(config).__name__}")
        self.config = config
        c = config.trunk
        td = c.temb_dim

        def res(cin, cout, resample=None):
            return ResBlock(cin, cout, td, 0.0, c.use_scale_shift_norm, resample)

        def attn(ch):
            return AttentionBlock(ch, c.heads(ch), new_order=False)  # create_classifier's default order

        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, td), nn.SiLU(), nn.Linear(td, td))
        self.input_blocks, skips = _encoder(c, res, attn)
        ch = skips[-1]
        self.middle_block = Block(res(ch, ch), attn(ch), res(ch, ch))
        if config.pool == "attention":
            spatial = c.image_size >> (c.num_levels - 1)
            head = [AttentionPool2d(spatial, ch, config.num_head_channels, config.num_classes)]
        else:
            head = [nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, config.num_classes, 1), nn.Flatten()]
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), *head)
        self.default_scale: float | None = None  # the README's --classifier_scale (set by the loader)
        # {"sha256": the file's, "flags": the CLASSIFIER_FLAGS it was read with} (set by the loader); a
        # sharded run records it in its settings
        self.source: dict | None = None

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise BadValue(
                f"x must be [B, {', '.join(map(str, want))}] (the classifier's size); got {tuple(x.shape)}"
            )
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, device=x.device)
        t = t.reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, c.width).to(self.time_embed[0].weight.dtype))
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        return self.out(self.middle_block(h, emb))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
