"""openai's improved-diffusion and guided-diffusion checkpoints: their flags and state dicts read into `ADM`.

A published checkpoint is a bare `UNetModel` state dict (`.pt`, read with torch.load(weights_only=True), or
the same tensors as `.safetensors`); its architecture and diffusion live only in the command-line flags
each repository's README prints:

    load_openai("64x64_diffusion.pt", flags="--attention_resolutions 32,16,8 --class_cond True ...")
    load_openai("64x64_diffusion.pt", preset="guided-imagenet64-cond")

`flags` takes MODEL_FLAGS, DIFFUSION_FLAGS (and SAMPLE_FLAGS / TRAIN_FLAGS, whose training and bookkeeping
flags are accepted and ignored) as one string. A flag left out takes the default of the repository the
checkpoint comes from; the two differ (improved-diffusion rescales timesteps by default, guided-diffusion
does not), so the source is `source=` or inferred: from flags only one repository has, from a published
file name, or from an image size only one repository supports; where the two repositories' defaults give
the same model and sampling defaults, either serves. The state dict cannot tell: both write the same key
names, and what only guided-diffusion builds (resblock_updown blocks, a half-width first level) needs
guided-only flags (or its 512 size) to describe anyway. Attention heads and the qkv order leave no trace in
the weights either: a wrong --num_heads, --num_head_channels or --use_new_attention_order loads silently.

The diffusion flags become the model's sampling defaults (`ModelDefaults`): noise_schedule and
diffusion_steps the schedule (linear betas scaled by 1000 / diffusion_steps, as both repositories do),
learn_sigma the variance (learned_range; else sigma_small ? fixed_small : fixed_large), timestep_respacing
the step count when it is a plain number, class_cond 1000 classes, clip_denoised the clipping.

guided-diffusion's noisy classifiers (`EncoderUNetModel`, for classifier guidance) load the same way from
their CLASSIFIER_FLAGS (`load_classifier(file, flags=...)`, `CLASSIFIER_PRESETS`) into `ADMClassifier`.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ddpm_fast.adm import ADM, CHANNEL_MULT, POOLS, ADMClassifier, ADMConfig, ClassifierConfig
from ddpm_fast.defaults import ModelDefaults, record
from ddpm_fast.errors import BadType, BadValue
from ddpm_fast.schedule import Schedule
from ddpm_fast.shards import file_sha256
from ddpm_fast.weights import load_state, read_weights

__all__ = [
    "PRESETS",
    "preset_config",
    "Preset",
    "SOURCES",
    "from_flags",
    "preset_for_file",
    "describe_state",
    "load_openai",
    "CLASSIFIER_PRESETS",
    "classifier_from_flags",
    "classifier_preset_for_file",
    "load_classifier",
]

log = logging.getLogger("ddpm_fast")

SOURCES = ("improved", "guided")
NUM_CLASSES = 1000  # both repositories' class_cond: ImageNet

# Each repository's model_and_diffusion_defaults() (improved_diffusion/ and guided_diffusion/script_util.py).
DEFAULTS = {
    "improved": {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "attention_resolutions": "16,8",
        "dropout": 0.0,
        "learn_sigma": False,
        "sigma_small": False,
        "class_cond": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "timestep_respacing": "",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": True,
        "rescale_learned_sigmas": True,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
    },
    "guided": {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "num_head_channels": -1,
        "attention_resolutions": "16,8",
        "channel_mult": "",
        "dropout": 0.0,
        "class_cond": False,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "use_fp16": False,
        "use_new_attention_order": False,
        "learn_sigma": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "timestep_respacing": "",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": False,
        "rescale_learned_sigmas": False,
    },
}

# The scripts' other flags (image_sample, image_train, classifier_sample): they change neither the network
# nor how it samples, except clip_denoised, which becomes ModelDefaults.clip.
SCRIPT_FLAGS = {
    "clip_denoised": True,
    **dict.fromkeys(
        ("num_samples", "batch_size", "use_ddim", "model_path", "data_dir", "schedule_sampler", "lr"), None
    ),
    **dict.fromkeys(
        ("weight_decay", "lr_anneal_steps", "microbatch", "ema_rate", "log_interval", "save_interval"), None
    ),
    **dict.fromkeys(("resume_checkpoint", "use_fp16", "fp16_scale_growth", "classifier_path"), None),
    **dict.fromkeys(
        ("classifier_scale", "classifier_use_fp16", "classifier_width", "classifier_depth"), None
    ),
    **dict.fromkeys(("classifier_attention_resolutions", "classifier_use_scale_shift_norm"), None),
    **dict.fromkeys(("classifier_resblock_updown", "classifier_pool"), None),
}


@dataclass(frozen=True)
class Preset:
    """A published checkpoint: its repository, file names and flags, as its README prints them."""

    source: str
    files: tuple[str, ...]
    flags: str


_GUIDED_IMAGENET = (
    "--attention_resolutions 32,16,8 --class_cond {cond} --diffusion_steps 1000 --image_size {size} "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True --timestep_respacing 250"
)
_GUIDED_LSUN = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout {dropout} "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True "
    "--timestep_respacing 1000"
)
_IMPROVED_UNCOND = (
    "--image_size {size} --num_channels 128 --num_res_blocks 3 --learn_sigma True{dropout} "
    "--diffusion_steps 4000 --noise_schedule cosine{kl}"
)

# MODEL_FLAGS + DIFFUSION_FLAGS of each README; guided-diffusion's also carry the --timestep_respacing of
# its SAMPLE_FLAGS (250 for ImageNet, 1000 for LSUN), which becomes the default step count.
PRESETS = {
    "improved-cifar10-uncond": Preset(
        "improved",
        ("cifar10_uncond_50M_500K.pt",),
        _IMPROVED_UNCOND.format(size=32, dropout=" --dropout 0.3", kl=""),
    ),
    "improved-cifar10-uncond-vlb": Preset(
        "improved",
        ("cifar10_uncond_vlb_50M_500K.pt",),
        _IMPROVED_UNCOND.format(size=32, dropout=" --dropout 0.3", kl=" --use_kl True"),
    ),
    "improved-imagenet64-uncond": Preset(
        "improved", ("imagenet64_uncond_100M_1500K.pt",), _IMPROVED_UNCOND.format(size=64, dropout="", kl="")
    ),
    "improved-imagenet64-uncond-vlb": Preset(
        "improved",
        ("imagenet64_uncond_vlb_100M_1500K.pt",),
        _IMPROVED_UNCOND.format(size=64, dropout="", kl=" --use_kl True"),
    ),
    "improved-imagenet64-cond": Preset(
        "improved",
        ("imagenet64_cond_270M_250K.pt",),
        "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True "
        "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False",
    ),
    "improved-lsun-bedroom": Preset(
        "improved",
        ("lsun_uncond_100M_1200K_bs128.pt", "lsun_uncond_100M_2400K_bs64.pt"),
        "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
        "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear "
        "--rescale_learned_sigmas False --rescale_timesteps False",
    ),
    "guided-imagenet64-cond": Preset(
        "guided",
        ("64x64_diffusion.pt",),
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
        "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
        "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True "
        "--timestep_respacing 250",
    ),
    "guided-imagenet128-cond": Preset(
        "guided",
        ("128x128_diffusion.pt",),
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
        "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True --timestep_respacing 250",
    ),
    "guided-imagenet256-cond": Preset(
        "guided", ("256x256_diffusion.pt",), _GUIDED_IMAGENET.format(cond=True, size=256)
    ),
    "guided-imagenet256-uncond": Preset(
        "guided", ("256x256_diffusion_uncond.pt",), _GUIDED_IMAGENET.format(cond=False, size=256)
    ),
    "guided-imagenet512-cond": Preset(
        "guided",
        ("512x512_diffusion.pt",),
        _GUIDED_IMAGENET.format(cond=True, size=512).replace("--use_fp16 True", "--use_fp16 False"),
    ),
    "guided-lsun-bedroom": Preset("guided", ("lsun_bedroom.pt",), _GUIDED_LSUN.format(dropout=0.1)),
    "guided-lsun-cat": Preset("guided", ("lsun_cat.pt",), _GUIDED_LSUN.format(dropout=0.1)),
    "guided-lsun-horse": Preset("guided", ("lsun_horse.pt",), _GUIDED_LSUN.format(dropout=0.1)),
    "guided-lsun-horse-nodropout": Preset(
        "guided", ("lsun_horse_nodropout.pt",), _GUIDED_LSUN.format(dropout=0.0)
    ),
}


def _preset(presets: dict, name: str, arg: str):
    """presets[name] (a Preset or ClassifierPreset); ValueError naming `arg` for a name not among them."""
    if name not in presets:
        raise BadValue(f"{arg} must be one of {sorted(presets)}; got {name!r}")
    return presets[name]


def _preset_for_file(presets: dict, name: str) -> str | None:
    """The first of `presets` whose published files include one with the stem of `name`, or None."""
    stem = Path(name).stem
    return next((k for k, p in presets.items() if any(Path(f).stem == stem for f in p.files)), None)


def _flags_or_preset(
    file: Path, flags, preset, presets: dict, parser, ask: str, what: str
) -> tuple[str, str | None]:
    """(the flags given, checked by `parser`, "" for none; the preset named, else the one a published file name
    implies when no flags are given); ValueError asking for `ask` for `what` when there is neither."""
    flags = "" if flags is None else flags
    if preset is None and parser.given(flags) == ({}, None):
        preset = _preset_for_file(presets, file.name)
        if preset is None:
            raise BadValue(f"{file}: pass {ask} (one of {sorted(presets)}) for {what}")
    return flags, preset


def preset_config(name: str) -> tuple[ADMConfig, ModelDefaults]:
    """A published checkpoint's (ADMConfig, ModelDefaults), from its README's flags."""
    p = _preset(PRESETS, name, "adm_preset")
    return from_flags(p.flags, p.source)


def preset_for_file(name: str) -> str | None:
    """The preset whose published file is called `name` (e.g. "64x64_diffusion.pt"), or None."""
    return _preset_for_file(PRESETS, name)


# ---------------------------------------------------------------------------------------------- flags


def _str2bool(value: str) -> bool:
    """openai's script_util.str2bool, the type of both repositories' boolean flags."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(value)


def _type(like, source: str):
    """argparse's type= for a flag whose default is `like`: its type, str2bool for a bool; None keeps the text."""
    if like is None or isinstance(like, str):
        return None
    convert = _str2bool if isinstance(like, bool) else type(like)
    kind = "a boolean (True/False)" if isinstance(like, bool) else type(like).__name__

    def typed(value: str):
        try:
            return convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind} ({source}-diffusion); got {value!r}") from None

    return typed


class _Flags(argparse.ArgumentParser):
    """The flags {name: default} as openai's scripts parse them (`--a 1` or `--a=1`, the last of a repeated
    flag wins), typed like their defaults; a mistake is a BadValue prefixed with `prog`, not an exit."""

    def __init__(self, prog: str, flags: dict, source: str = ""):
        super().__init__(prog=prog, add_help=False, allow_abbrev=False, exit_on_error=False)
        for name, like in flags.items():  # nargs="?": a flag without a value reads None, for our message
            self.add_argument(
                f"--{name}", type=_type(like, source), nargs="?", const=None, default=argparse.SUPPRESS
            )

    def error(self, message: str):
        raise BadValue(f"{self.prog}: {message}")

    def given(self, text: str) -> tuple[dict, str | None]:
        """(the flags `text` gives, by name; the name of the first flag this parser does not know, or None)."""
        if not isinstance(text, str):
            raise BadType(f"{self.prog} must be a string of --flag value pairs; got {type(text).__name__}")
        try:
            given, unknown = self.parse_known_args(shlex.split(text))
        except ValueError as e:  # shlex's
            self.error(f"cannot split {text!r} ({e})")
        except argparse.ArgumentError as e:  # a value its type refuses
            self.error(f"{e.argument_name} {e.message}")
        given = vars(given)
        for name in (k for k, v in given.items() if v is None):
            self.error(f"--{name} needs a value")
        if unknown and (not unknown[0].startswith("--") or unknown[0] == "--"):
            self.error(f"expected --flag, got {unknown[0]!r}")
        return given, unknown[0][2:].partition("=")[0] if unknown else None


_PARSERS = {s: _Flags("adm_flags", {**SCRIPT_FLAGS, **DEFAULTS[s]}, s) for s in SOURCES}
# Every flag of either repository, as text: which flags a string gives before its source is known.
_ANY = _Flags("adm_flags", dict.fromkeys([*DEFAULTS["improved"], *DEFAULTS["guided"], *SCRIPT_FLAGS]))


def _resolve(flags: str, source: str) -> dict:
    """Flags over the source's defaults, typed; ValueError for a flag the source does not know."""
    if source not in SOURCES:
        raise BadValue(f"adm_source must be one of {SOURCES}; got {source!r}")
    given, unknown = _PARSERS[source].given(flags)
    other = "guided" if source == "improved" else "improved"
    if unknown in DEFAULTS[other]:
        raise BadValue(
            f"adm_flags: --{unknown} is a flag of {other}-diffusion, not of {source}-diffusion "
            f"(adm_source={source!r})"
        )
    if unknown is not None:
        known = sorted(set(DEFAULTS[source]) | set(SCRIPT_FLAGS))
        raise BadValue(f"adm_flags: unknown flag --{unknown}; {source}-diffusion's are {known}")
    return {**DEFAULTS[source], **given}


def _schedule(kind: str, T: int) -> Schedule:
    if kind == "linear":  # Ho et al.'s betas, scaled to keep the same total noise for any T
        scale = 1000 / T
        return Schedule.linear(T, scale * 0.0001, scale * 0.02)
    if kind == "cosine":
        return Schedule.cosine(T)
    raise BadValue(f"adm_flags: --noise_schedule must be linear or cosine; got {kind!r}")


def _ints(name: str, text: str, kind=int) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise BadValue(f"adm_flags: --{name} must be comma-separated numbers; got {text!r}") from None


# ADMConfig field -> the flag that sets it, where the names differ.
_FLAG_OF = {
    "model_channels": "num_channels",
    "num_timesteps": "diffusion_steps",
    "out_channels": "learn_sigma",
}


def from_flags(flags: str, source: str) -> tuple[ADMConfig, ModelDefaults]:
    """openai flags (a string as the READMEs print them) -> (ADMConfig, ModelDefaults)."""
    a = _resolve(flags, source)
    size = a["image_size"]
    res = _ints("attention_resolutions", a["attention_resolutions"])
    mult = None
    if a.get("channel_mult"):
        mult = tuple(int(m) if m.is_integer() else m for m in _ints("channel_mult", a["channel_mult"], float))
    if a["predict_xstart"]:
        raise BadValue("adm_flags: --predict_xstart True is not supported (our samplers read an eps model)")
    T = a["diffusion_steps"]
    if T < 1:
        raise BadValue(f"adm_flags: --diffusion_steps must be a positive int; got {T!r}")
    head_ch = a.get("num_head_channels", -1)
    kw = dict(
        image_size=size,
        model_channels=a["num_channels"],
        out_channels=6 if a["learn_sigma"] else 3,
        num_res_blocks=a["num_res_blocks"],
        attention_resolutions=res,
        channel_mult=mult,
        dropout=a["dropout"],
        num_classes=NUM_CLASSES if a["class_cond"] else None,
        num_heads=a["num_heads"],
        num_head_channels=None if head_ch == -1 else head_ch,
        num_heads_upsample=None if a["num_heads_upsample"] == -1 else a["num_heads_upsample"],
        use_scale_shift_norm=a["use_scale_shift_norm"],
        resblock_updown=a.get("resblock_updown", False),
        use_new_attention_order=a.get("use_new_attention_order", False),
        rescale_timesteps=a["rescale_timesteps"],
        num_timesteps=T,
    )
    try:
        cfg = ADMConfig(**kw)
    except ValueError as e:  # name the flag, not our field
        msg = re.sub(r"ADMConfig\.(\w+)", lambda m: "--" + _FLAG_OF.get(m.group(1), m.group(1)), str(e))
        raise BadValue(f"adm_flags: {msg}") from e
    schedule = _schedule(a["noise_schedule"], T)

    spacing = a["timestep_respacing"]
    steps = None
    if spacing.isdigit():
        steps = int(spacing)
        if not 1 <= steps <= T:
            raise BadValue(f"adm_flags: --timestep_respacing must lie in [1, {T}]; got {spacing!r}")
    elif spacing:
        log.info(
            "adm_flags: --timestep_respacing %r is not a plain step count; the default step count is left "
            "unset (pass steps= / --steps)",
            spacing,
        )
    if a["learn_sigma"]:
        variance = "learned_range"
    else:
        variance = "fixed_small" if a.get("sigma_small") else "fixed_large"
    sampling = {"variance": variance, "steps": steps, "num_classes": cfg.num_classes}
    sampling["clip"] = a.get("clip_denoised", True)
    return cfg, record(sampling, cfg, schedule=schedule, arch="adm", where="adm_flags")


# ---------------------------------------------------------------------------------------------- state dicts


def _blocks(state: dict, prefix: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def describe_state(state: dict) -> dict:
    """What an openai UNetModel state dict shows of its flags (never the heads or the qkv order); partial
    for a dict of anything else."""
    seen = {}
    try:
        mc = state["time_embed.0.weight"].shape[1]
        seen["num_channels"] = mc
        seen["class_cond"] = "label_emb.weight" in state
        seen["learn_sigma"] = state["out.2.weight"].shape[0] == 2 * state["input_blocks.0.0.weight"].shape[1]
        emb, conv = (
            state["input_blocks.1.0.emb_layers.1.weight"],
            state["input_blocks.1.0.in_layers.2.weight"],
        )
        seen["use_scale_shift_norm"] = emb.shape[0] == 2 * conv.shape[0]
        # The decoder's upsampler sits in output block nrb of each level but the last: an Upsample conv or,
        # with resblock_updown, a second ResBlock.
        ups = sorted(
            int(m.group(1))
            for k in state
            if (m := re.match(r"output_blocks\.(\d+)\.[12]\.(conv|in_layers\.0)\.weight$", k))
        )
        n_out = _blocks(state, "output_blocks")
        nrb = ups[0] if ups else n_out - 1
        levels = n_out // (nrb + 1)
        seen["num_res_blocks"] = nrb
        seen["resblock_updown"] = any(
            ".in_layers.0." in k for k in state if re.match(r"output_blocks\.\d+\.[12]\.", k)
        )
        first = [(levels - 1 - lv) * (nrb + 1) for lv in range(levels)]
        chans = [state[f"output_blocks.{b}.0.out_layers.3.weight"].shape[0] for b in first]
        seen["channel_mult"] = tuple(c // mc if c % mc == 0 else c / mc for c in chans)
        seen["attention_levels"] = tuple(
            lv for lv, b in enumerate(first) if f"output_blocks.{b}.1.qkv.weight" in state
        )
    except (KeyError, IndexError, ZeroDivisionError):
        pass
    return seen


def _hints(seen: dict, cfg: ADMConfig, given: dict) -> list[str]:
    """The flags that likely disagree with the file, as '--flag value (why)'."""
    checks = [  # flag, the value the flags give
        ("num_channels", cfg.model_channels),
        ("class_cond", cfg.num_classes is not None),
        ("learn_sigma", cfg.out_channels == 2 * cfg.in_channels),
        ("use_scale_shift_norm", cfg.use_scale_shift_norm),
        ("resblock_updown", cfg.resblock_updown),
        ("num_res_blocks", cfg.num_res_blocks),
    ]
    out = [f"--{f} {seen[f]} (the flags give {v})" for f, v in checks if f in seen and seen[f] != v]
    if "channel_mult" in seen and tuple(seen["channel_mult"]) != cfg.channel_mult:
        mult = ",".join(str(m) for m in seen["channel_mult"])
        sizes = [size for size, m in CHANNEL_MULT.items() if m == seen["channel_mult"]]
        if "channel_mult" not in given and sizes:
            out.append(f"--image_size {sizes[0]} (its default channel_mult {mult} is the file's)")
        else:
            out.append(f"--channel_mult {mult} (the file's; the flags give {cfg.channel_mult})")
    elif "attention_levels" in seen:
        res = tuple(cfg.image_size >> lv for lv in seen["attention_levels"])
        if res != cfg.attention_resolutions:
            out.append(
                f"--attention_resolutions {','.join(map(str, res))} (the file's, at --image_size {cfg.image_size})"
            )
    return out


def _state_problems(ours: dict, state: dict) -> list[str]:
    """Every missing, unexpected and misshapen key of `state` against the model's own state dict `ours`."""
    problems = [f"missing key {k!r}" for k in ours if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in ours]
    problems += [
        f"key {k!r} has shape {tuple(state[k].shape)}, the flags give {tuple(v.shape)}"
        for k, v in ours.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    return problems


def _check_state(model, state: dict, file: Path, hints) -> None:
    """One ValueError listing the first mismatches between the file and the model the flags describe;
    `hints()` names the flags that are likely wrong (asked only when something does not fit)."""
    problems = _state_problems(model.state_dict(), state)
    if not problems:
        return
    hints = hints()
    likely = "; likely wrong: " + ", ".join(hints) if hints else ""
    first = "; ".join(problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise BadValue(f"{file}: the state dict does not fit the flags: {first}{more}{likely}")


# ---------------------------------------------------------------------------------------------- source


def _summary(cfg: ADMConfig, d: ModelDefaults) -> dict:
    return {**cfg.to_dict(), **d.sampling_dict(), "schedule": d.schedule.spec}


def _infer_source(flags: str, file: Path) -> str:
    given, _ = _ANY.given(flags)
    only = {s: set(DEFAULTS[s]) - set(DEFAULTS[o]) - set(SCRIPT_FLAGS) for s, o in (SOURCES, SOURCES[::-1])}
    hits = {s: sorted(set(given) & only[s]) for s in SOURCES}
    if hits["improved"] and hits["guided"]:
        raise BadValue(
            f"adm_flags mix improved-diffusion flags {hits['improved']} with guided-diffusion ones {hits['guided']}"
        )
    for s in SOURCES:
        if hits[s]:
            return s
    preset = preset_for_file(file.name)
    if preset is not None:
        return PRESETS[preset].source
    size = given.get("image_size", "64")
    if size in ("128", "512"):
        return "guided"
    if size == "32":
        return "improved"
    # Either repository's defaults may serve: they must give the same model and sampling defaults.
    a, b = (_summary(*from_flags(flags, s)) for s in SOURCES)
    if a == b:
        return "guided"
    diff = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b[k])
    raise BadValue(
        f"{file}: cannot tell whether it comes from improved-diffusion or guided-diffusion, whose defaults differ "
        f"for the flags left out ({diff}); pass adm_source='improved' or 'guided' (--adm-source)"
    )


# ---------------------------------------------------------------------------------------------- load


def load_openai(file, flags: str | None = None, source: str | None = None, preset: str | None = None) -> ADM:
    """An openai UNetModel state dict -> ADM carrying its sampling defaults. See the module docstring."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"openai checkpoint not found: {file}")
    if source is not None and source not in SOURCES:
        raise BadValue(f"adm_source must be one of {SOURCES}; got {source!r}")
    flags, preset = _flags_or_preset(
        file,
        flags,
        preset,
        PRESETS,
        _ANY,
        "adm_flags= (the README's MODEL_FLAGS and DIFFUSION_FLAGS) or adm_preset=",
        "an openai checkpoint",
    )
    if preset is not None:
        p = _preset(PRESETS, preset, "adm_preset")
        if source is not None and source != p.source:
            raise BadValue(f"adm_source {source!r} contradicts adm_preset {preset!r} ({p.source}-diffusion)")
        source = p.source
        flags = f"{p.flags} {flags}"  # the flags given after the preset's: the last of a flag wins
    state = read_weights(file)
    if source is None:
        source = _infer_source(flags, file)
    cfg, defaults = from_flags(flags, source)
    model = ADM(cfg)
    _check_state(model, state, file, lambda: _hints(describe_state(state), cfg, _ANY.given(flags)[0]))
    load_state(model, state, file, rename=None)
    model.defaults = defaults
    return model


# ---------------------------------------------------------------------------------------------- classifiers

# guided-diffusion's classifier_defaults() (script_util.py), and classifier_sample.py's --classifier_scale.
CLASSIFIER_DEFAULTS = {
    "image_size": 64,
    "classifier_use_fp16": False,
    "classifier_width": 128,
    "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8",
    "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True,
    "classifier_pool": "attention",
    "classifier_scale": 1.0,
}
CLASSIFIER_SIZES = (64, 128, 256, 512)  # the sizes create_classifier builds (its channel_mult table)


@dataclass(frozen=True)
class ClassifierPreset:
    """A published classifier: its file names and the flags of guided-diffusion's README (with the scale its
    sampling command uses; the 256x256 classifier guides the unconditional model at 10.0)."""

    files: tuple[str, ...]
    flags: str


CLASSIFIER_PRESETS = {
    "guided-imagenet64-classifier": ClassifierPreset(
        ("64x64_classifier.pt",), "--image_size 64 --classifier_depth 4 --classifier_scale 1.0"
    ),
    "guided-imagenet128-classifier": ClassifierPreset(
        ("128x128_classifier.pt",), "--image_size 128 --classifier_scale 0.5"
    ),
    "guided-imagenet256-classifier": ClassifierPreset(
        ("256x256_classifier.pt",), "--image_size 256 --classifier_scale 1.0"
    ),
    "guided-imagenet512-classifier": ClassifierPreset(
        ("512x512_classifier.pt",), "--image_size 512 --classifier_scale 4.0"
    ),
}

# ClassifierConfig / ADMConfig field -> the flag that sets it
_CLASSIFIER_FLAG_OF = {
    "model_channels": "classifier_width",
    "width": "classifier_width",
    "num_res_blocks": "classifier_depth",
    "depth": "classifier_depth",
    "attention_resolutions": "classifier_attention_resolutions",
    "pool": "classifier_pool",
}


# The classifier's flags, typed; the model, diffusion and script flags beside them are read as text and ignored.
_CLASSIFIER = _Flags(
    "classifier_flags",
    {**dict.fromkeys([*DEFAULTS["guided"], *SCRIPT_FLAGS]), **CLASSIFIER_DEFAULTS},
    "guided",
)


def classifier_from_flags(flags: str) -> tuple[ClassifierConfig, float]:
    """guided-diffusion classifier flags (CLASSIFIER_FLAGS as their README prints them; model, diffusion and
    sampling flags beside them are accepted and ignored) -> (ClassifierConfig, the --classifier_scale)."""
    given, unknown = _CLASSIFIER.given(flags)
    if unknown is not None:
        raise BadValue(
            f"classifier_flags: unknown flag --{unknown}; the classifier's are {sorted(CLASSIFIER_DEFAULTS)}"
        )
    a = {**CLASSIFIER_DEFAULTS, **{k: v for k, v in given.items() if k in CLASSIFIER_DEFAULTS}}
    size = a["image_size"]
    if size not in CLASSIFIER_SIZES:
        raise BadValue(
            f"classifier_flags: --image_size must be one of {CLASSIFIER_SIZES} (guided-diffusion's); got {size}"
        )
    if a["classifier_pool"] not in POOLS:
        raise BadValue(
            f"classifier_flags: --classifier_pool must be one of {POOLS}; got {a['classifier_pool']!r}"
        )
    scale = a["classifier_scale"]
    try:
        cfg = ClassifierConfig(
            image_size=size,
            width=a["classifier_width"],
            depth=a["classifier_depth"],
            attention_resolutions=_ints(
                "classifier_attention_resolutions", a["classifier_attention_resolutions"]
            ),
            use_scale_shift_norm=a["classifier_use_scale_shift_norm"],
            resblock_updown=a["classifier_resblock_updown"],
            pool=a["classifier_pool"],
        )
    except ValueError as e:  # name the flag, not our field
        msg = re.sub(
            r"(?:ADMConfig|ClassifierConfig)\.(\w+)",
            lambda m: "--" + _CLASSIFIER_FLAG_OF.get(m.group(1), m.group(1)),
            str(e),
        )
        raise BadValue(f"classifier_flags: {msg}") from e
    return cfg, scale


def _classifier_hints(state: dict, cfg: ClassifierConfig) -> list[str]:
    """The flags that likely disagree with the file, as '--flag value (the flags give ...)'."""
    out = []
    try:
        width = state["time_embed.0.weight"].shape[1]
        if width != cfg.width:
            out.append(f"--classifier_width {width} (the flags give {cfg.width})")
        L = cfg.trunk.num_levels
        depth = (_blocks(state, "input_blocks") - L) // L  # 1 + L * depth + (L - 1) blocks
        if depth != cfg.depth:
            out.append(f"--classifier_depth {depth} (the flags give {cfg.depth})")
        updown = not any(re.match(r"input_blocks\.\d+\.0\.op\.weight$", k) for k in state)  # Downsample convs
        if updown != cfg.resblock_updown:
            out.append(f"--classifier_resblock_updown {updown} (the flags give {cfg.resblock_updown})")
        emb, conv = (
            state["input_blocks.1.0.emb_layers.1.weight"],
            state["input_blocks.1.0.in_layers.2.weight"],
        )
        ss = emb.shape[0] == 2 * conv.shape[0]
        if ss != cfg.use_scale_shift_norm:
            out.append(f"--classifier_use_scale_shift_norm {ss} (the flags give {cfg.use_scale_shift_norm})")
    except (KeyError, IndexError):
        pass
    return out


def classifier_preset_for_file(name: str) -> str | None:
    """The classifier preset whose published file is called `name` (e.g. "128x128_classifier.pt"), or None."""
    return _preset_for_file(CLASSIFIER_PRESETS, name)


def load_classifier(file, flags: str | None = None, preset: str | None = None) -> ADMClassifier:
    """A guided-diffusion classifier state dict -> ADMClassifier (eval mode) with `default_scale` set from
    --classifier_scale. flags: CLASSIFIER_FLAGS; preset: a CLASSIFIER_PRESETS name, implied by a published
    file name when neither is given. A key or shape that does not fit is one ValueError naming the likely flag."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"classifier file not found: {file}")
    flags, preset = _flags_or_preset(
        file,
        flags,
        preset,
        CLASSIFIER_PRESETS,
        _CLASSIFIER,
        "classifier_flags= (the README's CLASSIFIER_FLAGS) or classifier_preset=",
        "a guided-diffusion classifier",
    )
    if preset is not None:
        flags = f"{_preset(CLASSIFIER_PRESETS, preset, 'classifier_preset').flags} {flags}"
    cfg, scale = classifier_from_flags(flags)
    state = read_weights(file)
    model = ADMClassifier(cfg)
    _check_state(model, state, file, lambda: _classifier_hints(state, cfg))
    load_state(model, state, file, rename=None)
    model.default_scale = scale
    model.source = {
        "sha256": file_sha256(file),
        "flags": " ".join(f"--{k} {v}" for k, v in sorted(_ANY.given(flags)[0].items())),  # as given
    }
    return model.eval()
