"""The DDPM U-Net (Ho et al. 2020), the same function as diffusers' `UNet2DModel` with DDPM block types.

Structure, for L = len(block_out_channels) levels, level 0 at full resolution:

    t -> sinusoid(ch0) -> Linear -> SiLU -> Linear = emb                      (time_mlp)
    x -> conv_in -> [level i: layers_per_block x (ResBlock [+ Attn]), then Downsample unless last]
      -> mid: ResBlock, Attn, ResBlock
      -> [level i reversed: (layers_per_block + 1) x (cat skip, ResBlock [+ Attn]), then Upsample unless first]
      -> GroupNorm -> SiLU -> conv_out

    ResBlock(h, emb) = skip(h) + conv2(dropout(SiLU(GN2(conv1(SiLU(GN1(h))) + Linear(SiLU(emb))))))
    Attn(h)          = h + proj(softmax(q k^T / sqrt(d)) v),  q, k, v = Linear(GN(h)) per position

Downsample is a stride-2 3x3 conv (with `downsample_padding=0` the input is padded by one pixel on the
right and bottom only, as the original TensorFlow code does); Upsample is nearest x2 then a 3x3 conv.

Parameter names are our own; `diffusers_key(name)` maps each one to diffusers' name (a bijection, tested),
which is all `ddpm_fast.checkpoint` needs to import diffusers checkpoints.
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

__all__ = ["UNetConfig", "UNet", "diffusers_key", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig(ConfigRecord):
    """Every knob of the DDPM U-Net. `attn_levels` index `block_out_channels` (0 = full resolution)."""

    in_channels: int = 3
    out_channels: int = 3  # 2 * in_channels for a learned variance (improved DDPM's learned_range)
    sample_size: int = 32  # the training resolution; any multiple of 2**(levels-1) runs
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    attn_levels: tuple[int, ...] = (1,)
    mid_attention: bool = True
    attention_head_dim: int | None = None  # None: one head over all channels (original DDPM)
    norm_num_groups: int = 32
    mid_attn_norm_groups: int | None = None  # None: norm_num_groups; 0: no GroupNorm before mid attention
    norm_eps: float = 1e-6
    dropout: float = 0.0
    time_embed_dim: int | None = None  # None: 4 * block_out_channels[0]
    freq_shift: float = 1.0
    flip_sin_to_cos: bool = False
    downsample_padding: int = 0
    scale_shift_norm: bool = False  # improved DDPM's GN(h) * (1 + scale) + shift instead of h + emb
    mid_scale_factor: float = 1.0  # diffusers' mid_block_scale_factor: mid outputs are divided by it
    center_input_sample: bool = False  # x -> 2x - 1 first

    def __post_init__(self):
        # Lists from JSON become tuples so configs compare and hash.
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "attn_levels", tuple(sorted(set(self.attn_levels))))
        self._validate()

    def _validate(self):
        def pos_int(name):
            check_int(getattr(self, name), f"UNetConfig.{name}")

        for name in ("in_channels", "out_channels", "sample_size", "layers_per_block", "norm_num_groups"):
            pos_int(name)
        ch = self.block_out_channels
        if not ch or any(not is_int(c) or c < 1 for c in ch):
            raise BadValue(f"UNetConfig.block_out_channels must be positive ints; got {ch!r}")
        L = len(ch)
        for c in ch:
            if c % self.norm_num_groups:
                raise BadValue(
                    f"UNetConfig.norm_num_groups ({self.norm_num_groups}) must divide every block_out_channels "
                    f"entry; got {c}"
                )
        for lv in self.attn_levels:
            if not is_int(lv) or not 0 <= lv < L:
                raise BadValue(f"UNetConfig.attn_levels must be level indices in [0, {L - 1}]; got {lv!r}")
        hd = self.attention_head_dim
        if hd is not None:
            if not is_int(hd) or hd < 1:
                raise BadValue(f"UNetConfig.attention_head_dim must be a positive int or None; got {hd!r}")
            for c in [ch[lv] for lv in self.attn_levels] + ([ch[-1]] if self.mid_attention else []):
                if c % hd:
                    raise BadValue(f"UNetConfig.attention_head_dim ({hd}) must divide attention channels {c}")
        mg = self.mid_attn_norm_groups
        if mg is not None and (not is_int(mg) or mg < 0 or (mg and ch[-1] % mg)):
            raise BadValue(f"UNetConfig.mid_attn_norm_groups must be None, 0 or divide {ch[-1]}; got {mg!r}")
        if self.sample_size % (2 ** (L - 1)):
            raise BadValue(
                f"UNetConfig.sample_size must be a multiple of 2**(levels-1) = {2 ** (L - 1)}; got {self.sample_size}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise BadValue(f"UNetConfig.dropout must lie in [0, 1); got {self.dropout!r}")
        if not self.norm_eps > 0:
            raise BadValue(f"UNetConfig.norm_eps must be positive; got {self.norm_eps!r}")
        if self.time_embed_dim is not None:
            pos_int("time_embed_dim")
        if ch[0] < 2 or ch[0] // 2 == self.freq_shift:
            raise BadValue(
                f"UNetConfig.freq_shift ({self.freq_shift}) must differ from block_out_channels[0] // 2 ({ch[0] // 2})"
            )
        if self.downsample_padding not in (0, 1):
            raise BadValue(f"UNetConfig.downsample_padding must be 0 or 1; got {self.downsample_padding!r}")
        if self.mid_scale_factor == 0:
            raise BadValue("UNetConfig.mid_scale_factor must be non-zero; got 0")

    # ------------------------------------------------------------------ derived
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model was built for."""
        return (self.in_channels, self.sample_size, self.sample_size)

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.block_out_channels[0]

    # ------------------------------------------------------------------ presets
    @classmethod
    def cifar10(cls, **overrides) -> UNetConfig:
        """google/ddpm-cifar10-32: 35,746,307 parameters; dropout 0.1 as trained in the paper."""
        return cls(dropout=0.1).replace(**overrides)

    @classmethod
    def celebahq256(cls, **overrides) -> UNetConfig:
        """google/ddpm-celebahq-256 (also ddpm-church-256, ddpm-bedroom-256): attention at 16x16."""
        cfg = cls(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512), attn_levels=(4,))
        return cfg.replace(**overrides)

    @classmethod
    def church256(cls, **overrides) -> UNetConfig:
        """google/ddpm-church-256: the same architecture as celebahq256."""
        return cls.celebahq256(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> UNetConfig:
        """3x16x16, two levels, attention at 8x8 and in the middle: for tests (~0.5M parameters)."""
        cfg = cls(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            attn_levels=(1,),
            norm_num_groups=8,
        )
        return cfg.replace(**overrides)

    @classmethod
    def digits(cls, **overrides) -> UNetConfig:
        """1x8x8 (sklearn digits; `sample_size=16` for upscaled digits), two levels, attention at the lower one."""
        cfg = cls(
            in_channels=1,
            out_channels=1,
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=2,
            attn_levels=(1,),
            norm_num_groups=8,
            dropout=0.1,
        )
        return cfg.replace(**overrides)


# ---------------------------------------------------------------------------------------------- layers


def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: float = 1.0, flip_sin_to_cos: bool = False):
    """[sin(t w_i), cos(t w_i)], w_i = exp(-ln(10000) i / (dim/2 - freq_shift)), i < dim/2; float32, [B, dim]."""
    half = dim // 2
    # Same op order as diffusers' get_timestep_embedding, so the float32 rounding matches.
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    arg = t[:, None].float() * freqs[None, :]
    emb = torch.cat(
        [torch.cos(arg), torch.sin(arg)] if flip_sin_to_cos else [torch.sin(arg), torch.cos(arg)], -1
    )
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        temb: int,
        groups: int,
        eps: float,
        dropout: float,
        scale_shift: bool = False,
        out_scale: float = 1.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, 2 * cout if scale_shift else cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.scale_shift = scale_shift
        self.out_scale = out_scale

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        """`emb_act` is SiLU(emb), shared by every block."""
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.temb(emb_act)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        s = x if self.skip is None else self.skip(x)
        out = s + h
        return out if self.out_scale == 1.0 else out / self.out_scale


class Attention(nn.Module):
    def __init__(self, ch: int, head_dim: int | None, groups: int, eps: float, out_scale: float = 1.0):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=eps) if groups else None
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj = nn.Linear(ch, ch)
        self.heads = ch // (head_dim or ch)
        self.out_scale = out_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = x if self.norm is None else self.norm(x)
        h = h.reshape(B, C, H * W).transpose(1, 2)  # [B, HW, C]

        def heads(y):
            return y.reshape(B, H * W, self.heads, C // self.heads).transpose(1, 2)

        a = attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        a = self.proj(a.transpose(1, 2).reshape(B, H * W, C))
        out = x + a.transpose(1, 2).reshape(B, C, H, W)
        return out if self.out_scale == 1.0 else out / self.out_scale


class Downsample(nn.Module):
    def __init__(self, ch: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)
        self.pad_right = padding == 0

    def forward(self, x):
        if self.pad_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: resnets, optional attentions, optional resampler."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module] | None, resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn) if attn else None
        self.resample = resample


class Mid(nn.Module):
    def __init__(self, res: list[nn.Module], attn: list[nn.Module] | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn) if attn else None


# ---------------------------------------------------------------------------------------------- model


class UNet(nn.Module):
    """eps (or [eps, v] for 2C outputs) = UNet(config)(x [B,C,H,W] float, t [B] or [] int64)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise BadType(f"config must be a UNetConfig; got {type(config).__name__}")
        self.config = c = config
        # How to sample it (ddpm_fast.defaults): set by ddpm_fast.checkpoint.load_model, read by ddpm_fast.sample.
        learned = c.out_channels == 2 * c.in_channels
        self.defaults = ModelDefaults(
            variance="learned_range" if learned else "fixed_small", image_shape=tuple(c.image_shape)
        )
        ch, L, nl = c.block_out_channels, c.num_levels, c.layers_per_block
        g, eps, dp, td = c.norm_num_groups, c.norm_eps, c.dropout, c.temb_dim

        def res(cin, cout, out_scale=1.0):
            return ResBlock(cin, cout, td, g, eps, dp, c.scale_shift_norm, out_scale)

        def attn(cc):
            return Attention(cc, c.attention_head_dim, g, eps)

        self.time_mlp = nn.Sequential(nn.Linear(ch[0], td), nn.SiLU(), nn.Linear(td, td))
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)

        self.down = nn.ModuleList()
        cin = ch[0]
        for i, cout in enumerate(ch):
            rs = [res(cin if j == 0 else cout, cout) for j in range(nl)]
            ats = [attn(cout) for _ in range(nl)] if i in c.attn_levels else None
            self.down.append(Level(rs, ats, Downsample(cout, c.downsample_padding) if i < L - 1 else None))
            cin = cout

        mc, ms = ch[-1], c.mid_scale_factor
        mg = g if c.mid_attn_norm_groups is None else c.mid_attn_norm_groups
        mid_attn = [Attention(mc, c.attention_head_dim, mg, eps, ms)] if c.mid_attention else None
        self.mid = Mid([res(mc, mc, ms), res(mc, mc, ms)], mid_attn)

        # Decoder level k works at resolution L-1-k; its j-th resnet concatenates the skip popped j-th.
        skips = [ch[0]] + [ch[i] for i in range(L) for _ in range(nl + (1 if i < L - 1 else 0))]
        self.up = nn.ModuleList()
        prev = ch[-1]
        for k in range(L):
            i = L - 1 - k
            cout = ch[i]
            rs = []
            for _ in range(nl + 1):
                rs.append(res(prev + skips.pop(), cout))
                prev = cout
            ats = [attn(cout) for _ in range(nl + 1)] if i in c.attn_levels else None
            self.up.append(Level(rs, ats, Upsample(cout) if i > 0 else None))

        self.norm_out = nn.GroupNorm(g, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    @property
    def schedule(self):
        """The training schedule of the model's record (`self.defaults.schedule`); assignable."""
        return self.defaults.schedule

    @schedule.setter
    def schedule(self, value) -> None:
        self.defaults = self.defaults.replace(schedule=value)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise BadValue(f"x must be [B, {c.in_channels}, H, W]; got shape {tuple(x.shape)}")
        m = 2 ** (c.num_levels - 1)
        if x.shape[-2] % m or x.shape[-1] % m:
            raise BadValue(f"x's height and width must be multiples of {m}; got shape {tuple(x.shape)}")
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, device=x.device)
        # A 0-d or 1-element t is shared by the whole batch.
        t = t.reshape(-1).expand(x.shape[0])

        temb = timestep_embedding(t, c.block_out_channels[0], c.freq_shift, c.flip_sin_to_cos)
        emb = self.time_mlp(temb.to(self.conv_in.weight.dtype))
        emb_act = F.silu(emb)  # every ResBlock applies SiLU before its projection: do it once

        if c.center_input_sample:
            x = 2 * x - 1.0
        h = self.conv_in(x)
        hs = [h]
        for lvl in self.down:
            for j, r in enumerate(lvl.res):
                h = r(h, emb_act)
                if lvl.attn is not None:
                    h = lvl.attn[j](h)
                hs.append(h)
            if lvl.resample is not None:
                h = lvl.resample(h)
                hs.append(h)

        h = self.mid.res[0](h, emb_act)
        if self.mid.attn is not None:
            h = self.mid.attn[0](h)
        h = self.mid.res[1](h, emb_act)

        for lvl in self.up:
            for j, r in enumerate(lvl.res):
                h = r(torch.cat([h, hs.pop()], dim=1), emb_act)
                if lvl.attn is not None:
                    h = lvl.attn[j](h)
            if lvl.resample is not None:
                h = lvl.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------- key map

# Our module name -> diffusers' module name, token by token (a parameter name is a dotted path).
_TOKENS = {
    "time_mlp.0": "time_embedding.linear_1",
    "time_mlp.2": "time_embedding.linear_2",
    "down": "down_blocks",
    "up": "up_blocks",
    "mid": "mid_block",
    "res": "resnets",
    "attn": "attentions",
    "temb": "time_emb_proj",
    "skip": "conv_shortcut",
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj": "to_out.0",
    "norm_out": "conv_norm_out",
}


def diffusers_key(name: str) -> str:
    """Our parameter name -> diffusers UNet2DModel's, e.g. down.1.attn.0.q.weight -> down_blocks.1.attentions.0.to_q.weight."""
    if name.startswith("time_mlp."):
        head, _, leaf = name.rpartition(".")
        return f"{_TOKENS[head]}.{leaf}"
    parts = name.split(".")
    out = []
    for i, p in enumerate(parts):
        if p == "resample":
            # Level 0..L-2 of the encoder downsamples; of the decoder, every level but the last upsamples.
            out.append("downsamplers.0" if parts[0] == "down" else "upsamplers.0")
        elif i == len(parts) - 1:
            out.append(p)  # weight / bias
        else:
            out.append(_TOKENS.get(p, p))
    return ".".join(out)
