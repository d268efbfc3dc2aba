"""The backbone's compute precision: float32, or mixed bfloat16/float16 where hardware has it.

Mixed precision keeps float32 weights and runs the layers in 16 bits (Keras' mixed_* dtype
policies); the cut's outputs are cast back to float32 and stored as --dtype says. A CPU with
AVX512_BF16 or AMX runs dense bfloat16 convolutions about twice as fast as float32; without
them 16-bit math is emulated and no faster, so `auto` picks a 16-bit precision only where the
hardware runs it natively. On a CPU, depthwise convolutions (MobileNet, EfficientNet) ran
slower in bfloat16 than in float32, so `auto` keeps those backbones in float32 there.
No TensorFlow import unless an NVIDIA driver is present.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Collection, Iterator
from pathlib import Path

PRECISIONS = ("float32", "bfloat16", "float16")
CHOICES = ("auto", *PRECISIONS)
KERAS_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}

# CPU flags (as /proc/cpuinfo names them) that make a 16-bit type run natively
CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
# GPU compute capability from which tensor cores run the type (Ampere for bf16, Volta fp16)
GPU_CAPABILITY = {"bfloat16": (8, 0), "float16": (7, 0)}
AUTO_ORDER = ("bfloat16", "float16")  # bfloat16 first: float32's range, no loss scaling

log = logging.getLogger("featurepipe.precision")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags; empty where /proc/cpuinfo is missing (macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def gpu_capability() -> tuple[int, int] | None:
    """Compute capability of the first GPU TensorFlow sees, or None (no driver, no GPU)."""
    if not Path("/proc/driver/nvidia/version").exists():
        return None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
    return tuple(capability) if capability else None


def native_precisions(flags: Collection[str], capability: tuple[int, int] | None) -> list[str]:
    """16-bit precisions the hardware runs natively: the GPU's when there is one (it runs the
    backbone then), else the CPU's."""
    if capability is not None:
        return [p for p in AUTO_ORDER if capability >= GPU_CAPABILITY[p]]
    return [p for p in AUTO_ORDER if any(flag in flags for flag in CPU_FLAGS[p])]


@functools.cache
def hardware() -> tuple[str, tuple[str, ...]]:
    """What runs the backbone here, in words, and its native 16-bit precisions (cached)."""
    capability = gpu_capability()
    where = f"GPU (compute capability {capability})" if capability else "CPU"
    return where, tuple(native_precisions(cpu_flags(), capability))


def resolve_precision(requested: str, depthwise: bool = False) -> str:
    """The precision a run uses: `auto` becomes the fastest native one, else float32 (said in
    a log line); an explicit 16-bit choice is kept, with a warning where it is emulated.

    `depthwise`: the backbone is built of depthwise convolutions, which `auto` keeps in
    float32 on a CPU (they gain nothing there; measured in benchmarks/README.md).
    """
    if requested not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "float32":
        return requested
    where, native = hardware()
    if requested == "auto":
        if not native:
            _note(f"precision auto: float32 ({where} runs no bfloat16 or float16 natively)")
            return "float32"
        if depthwise and where == "CPU":
            _note(
                "precision auto: float32 (depthwise convolutions run no faster in 16 bits on a CPU)"
            )
            return "float32"
        return native[0]
    if requested not in native:
        _note(
            f"precision {requested}: this {where} has no native {requested}; it is emulated, "
            "likely slower than float32",
            logging.WARNING,
        )
    return requested


@contextlib.contextmanager
def keras_policy(precision: str) -> Iterator[None]:
    """Build (or load) models in `precision` (resolved, not auto): their layers keep its dtype
    policy. The previous global policy (per thread) comes back afterwards, so models built
    later in the process, such as dense heads or another extraction, are not affected."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(KERAS_POLICIES[precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@functools.cache
def _note(message: str, level: int = logging.INFO) -> None:
    """Log each distinct message once per process (plans are made many times per run)."""
    log.log(level, message)
