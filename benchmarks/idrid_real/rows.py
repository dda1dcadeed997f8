"""idrid_real's rows: what each row trains, as ONE command line, and the screening levers."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import PROJECT_ROOT
from benchmarks.idrid_real.unet import UNET, UNET_QUICK

FINAL_MINUTES = 30.0
THRESHOLD = 0.5

# key -> (lesion, kind, seed); kinds: stage1 (CBAM started as rmib does), stage1_woo
# (CBAM started as Woo et al.: `--cbam-init woo`), stage1_bal (the loss weighted by
# inverse class frequency: the class-balance lever), a transferred frozen encoder (the
# default), b from scratch, c local-global, d Dual2Net, e the plain U-Net reference.
ROWS = {key: (None, key, 0) for key in ("stage1", "stage1_woo", "stage1_bal")}
ROWS.update({f"EX_{k}_seed{s}": ("EX", k, s) for k in "ab" for s in (0, 1)})
ROWS.update({"EX_c": ("EX", "c", 0), "EX_d": ("EX", "d", 0), "EX_e": ("EX", "e", 0)})
ROWS.update({f"{lesion}_{k}": (lesion, k, 0) for lesion in ("HE", "MA", "SE") for k in "abe"})
STAGE1_KINDS = ("stage1", "stage1_woo", "stage1_bal")
_STAGE1_FLAGS = {"stage1_woo": ["--cbam-init", "woo"], "stage1_bal": ["--class-weights"]}
# Dual2Net's row: the paper's 960 x 1440 at output stride 8 needs about 30 GB
# (segment/README.md), so the row trains at a third of each side, stride 8 kept.
DUAL2NET_SIZE = (320, 480)
KIND_NAMES = {
    "stage1": "stage 1: VGG16-CBAM lesion / healthy classifier, from scratch",
    "stage1_woo": "stage 1 as above, CBAM started as Woo et al. (`--cbam-init woo`)",
    "stage1_bal": "stage 1 as above, loss weighted by inverse class frequency (`--class-weights`)",
    "a": "encoder-decoder, transferred frozen stage-1 encoder (the default)",
    "b": "encoder-decoder, VGG16-CBAM from scratch",
    "c": "fused local-global U-Net (Yan et al.)",
    "d": "Dual2Net + DSM Dice",
    "e": "plain 4-level U-Net reference (keras-io style)",
}
QUICK_ROWS = ("stage1", "EX_a_seed0", "EX_e")

# Levers screened on EX (`--lever NAME`, 10-minute rows): each is a set of recipe
# overrides applied to the row's recipe (written as a derived TOML in the work
# directory; "[train]" keys as a nested table), one change at a time against
# "base". Screening rows are stored as "<row>+<lever>".
_HALF = {"scale": 0.5, "patches_per_epoch": 1024, "val_every": 1, "augment": "free"}
# The screening base: at scale 0.5 one whole-image validation of the 11 photographs
# costs about 5 minutes of one core (27 s a photograph) and an epoch of 1024 patches
# 6.5 minutes, so a 10-minute row validated every epoch trains one epoch. The base
# validates once, after the last epoch, with short epochs (256 patches) so the time
# limit ends training within a couple of minutes of it, at a constant learning rate.
_BASE = {
    "scale": 0.5,
    "patches_per_epoch": 256,
    "val_every": 1000,
    "augment": "free",
    "train": {"lr_schedule": "constant"},
}
_ROT90 = {**_BASE, "augment": "rot90"}
LEVERS = {
    "scale0.5": ("working resolution 0.5, 1024 patches an epoch, validated every epoch", _HALF),
    "base": ("scale 0.5, 256 patches an epoch, validated after the last, constant rate", _BASE),
    "p256": ("base, 256-px patches, batch 8 (about the pixels of 16 x 160 px)",
             {**_BASE, "patch_size": 256, "train": {"lr_schedule": "constant", "batch_size": 8}}),
    "bcedice": ("base, BCE + Dice loss", {**_BASE, "loss": "bce+dice"}),
    "rot90": ("base, flips and quarter turns only", _ROT90),
    "colour": ("rot90 (adopted), plus colour and contrast jitter 0.1",
               {**_ROT90, "colour_jitter": 0.1}),
    # Screened after rot90 was adopted: one change each on top of it.
    "noclahe": ("rot90 (adopted), no CLAHE (raw RGB)", {**_ROT90, "preprocessing": "none"}),
    "lr3e-4": ("rot90 (adopted), learning rate 3e-4",
               {**_ROT90, "train": {"lr_schedule": "constant", "learning_rate": 3e-4}}),
    "pos0.25": ("rot90 (adopted), a quarter of the patches centred on a lesion",
                {**_ROT90, "pos_fraction": 0.25}),
    "dice": ("rot90 (adopted), Dice loss alone", {**_ROT90, "loss": "dice"}),
    # "poly" decays to 0 over the epochs, so it gets the 8 epochs 10 minutes hold.
    "poly": ("rot90 (adopted), the rate decayed polynomially (power 0.9) to 0 over 8 epochs",
             {**_ROT90, "train": {"lr_schedule": "poly"}, "_cli": ["--epochs", "8"]}),
    "bf16": ("base, trained in mixed_bfloat16 (a precision row: CPUs with avx512_bf16)",
             {**_BASE, "_cli": ["--precision", "mixed_bfloat16"]}),
    # 30-minute pairs on another CPU model (rows compare only on one CPU model): the
    # recipe unchanged, in float32 as the row, and in what `auto` picks on native bf16.
    "recipe": ("the recipe unchanged (the row again, beside `recipe_bf16` on another CPU)", {}),
    "recipe_bf16": ("the recipe unchanged, trained in mixed_bfloat16 (`--precision auto` on "
                    "a CPU with native bfloat16)", {"_cli": ["--precision", "mixed_bfloat16"]}),
}  # fmt: skip
# Levers that leave the recipe as it is: allowed in 30-minute rows (the others screen).
FINAL_LEVERS = ("recipe", "recipe_bf16")


def run_name(key: str, ctx: dict) -> str:
    """The row's name in the results and its run directory: "<row>+<lever>" when screening."""
    return key if ctx.get("lever") is None else f"{key}+{ctx['lever']}"


def lever_recipe(recipe: Path, lever: str, workdir: Path) -> Path:
    """`recipe` with the overrides of `LEVERS[lever]`, written under `workdir/recipes`."""
    import tomllib

    from rmib.config import dump_toml

    data = tomllib.loads(recipe.read_text())
    for key, value in LEVERS[lever][1].items():
        if key == "_cli":  # command-line flags, appended to the row's command (they win)
            continue
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    out = workdir / "recipes" / f"{recipe.stem}+{lever}.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# {recipe.name} with the lever {lever}: {LEVERS[lever][0]}\n" + dump_toml(data)
    )
    return out


def _rmib(*args) -> list[str]:
    return ["rmib", *map(str, args)]


def row_command(key: str, ctx: dict) -> list[str]:
    """The one command line that trains row `key` (without a taskset prefix)."""
    return [str(arg) for arg in _row_arguments(key, ctx)]


def _row_arguments(key: str, ctx: dict) -> list:
    lesion, kind, seed = ROWS[key]
    quick, out = ctx["quick"], ctx["workdir"] / run_name(key, ctx)
    common = ["--time-limit", ctx["minutes"], "--precision", "float32", "--seed", seed]
    common += ["--out", out]
    if kind in STAGE1_KINDS:
        size, batch = (64, 8) if quick else (256, 8)
        init = _STAGE1_FLAGS.get(kind, [])
        return _rmib(
            "pretrain", "--data", ctx["stage1_data"], "--backbone", "vgg16", "--cbam", *init,
            "--image-size", size, "--batch-size", batch, "--weights", "none",
            "--val-fraction", 0.2, "--epochs", 1000, *common,
        )  # fmt: skip
    val = [a for name in ctx["val_names"] for a in ("--val-names", name)]
    data = ["--data", ctx["data"], "--lesion", lesion, *val]
    if kind == "e":
        sizes = UNET_QUICK if quick else UNET
        return [
            "python", "-m", "benchmarks.idrid_real", "unet", *data,
            "--patch-size", sizes["patch_size"], "--scale", sizes["scale"],
            "--batch-size", sizes["batch_size"], *common,
        ]  # fmt: skip
    cache = ["--cache-dir", ctx["workdir"] / "cache"]
    small = ["--patch-size", 64, "--patches-per-epoch", 32, "--batch-size", 4] if quick else []
    recipe = PROJECT_ROOT / "segment"
    if kind in "ab":
        encoder = ctx["workdir"] / "stage1" if kind == "a" else "vgg16"
        scratch = ["--cbam", "--weights", "none"] if kind == "b" else []
        scale = ["--scale", 0.25] if quick else []
        config = recipe / f"idrid_{lesion.lower()}_vgg16_cbam.toml"
        if ctx.get("lever"):
            config = lever_recipe(config, ctx["lever"], ctx["workdir"])
        return _rmib(
            "segment", "--config", config,
            "--encoder", encoder, *scratch, *data, *cache, *small, *scale, "--epochs", 1000,
            *common, *(LEVERS[ctx["lever"]][1].get("_cli", []) if ctx.get("lever") else []),
        )  # fmt: skip
    if kind == "c":
        sizes = ["--global-size", 64, "--base-filters", 4] if quick else []
        return _rmib(
            "segment", "--config", recipe / "idrid_ex_local_global.toml", *data, *cache,
            *sizes, *common,
        )  # fmt: skip
    sizes = ["--image-size", *((64, 96) if quick else DUAL2NET_SIZE)]
    return _rmib(
        "segment", "--config", recipe / "idrid_ex_dual2net.toml", *data, *cache, *sizes,
        "--weights", "none", *common,
    )  # fmt: skip


def evaluate_command(key: str, ctx: dict) -> list[str]:
    run = ctx["workdir"] / run_name(key, ctx)
    names = [a for name in ctx["val_names"] for a in ("--names", name)]
    return _rmib(
        "evaluate", run, "--data", ctx["data"], *names, "--out", run / "evaluation",
        "--threshold", THRESHOLD, "--no-overlays",
    )  # fmt: skip
