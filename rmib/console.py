"""What a person reads while rmib runs: training verbosity and TensorFlow's start-up log.

Imports no TensorFlow, so the command line can set both before anything imports it.

- `training_verbosity`: Keras' progress bar on a terminal, one line per epoch
  when stdout is a file or a pipe (no carriage returns or ANSI codes in a
  log); `set_training_verbosity` (`--verbose 0|1|2`) overrides it for the process.
- `import_tensorflow_quietly`: imports TensorFlow and finds its devices with
  the C++ start-up lines (oneDNN notice, "Could not find cuda drivers",
  the error-level `cuInit` line of a machine without a GPU) filtered out;
  other lines its C++ code writes then are passed on, and Python's warnings
  are not touched (`--tf-log` shows all).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# None: decided by the terminal (see `training_verbosity`).
_verbosity: int | None = None

# The lines TensorFlow writes to stderr when it starts: absl's C++ log lines
# ("I0000 00:00:17... 3067 port.cc:153] oneDNN ...") of level INFO or WARNING,
# the notice that absl is not initialised yet, and the errors of probing CUDA
# on a machine without a GPU (cuInit, cuDNN/cuFFT/cuBLAS factories).
_ABSL_LINE = re.compile(r"^([IWE])\d{4} [\d:.]+\s+\d+ \S+:\d+\] (.*)$")
_CUDA_PROBE = re.compile(r"cuInit|CUDA|cuda|cuDNN|cuFFT|cuBLAS|TensorRT|GPU will not be used")
_ABSL_NOTICE = "All log messages before absl::InitializeLog() is called are written to STDERR"


def set_training_verbosity(verbose: int | None) -> None:
    """Set the verbosity of every training in this process (None: by the terminal).

    Raises:
        ValueError: not 0, 1, 2 or None.
    """
    global _verbosity
    if verbose not in (None, 0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    _verbosity = verbose


def training_verbosity(verbose: int | None = None) -> int:
    """The verbosity a training uses: `verbose` when given, else the process's setting,
    else 1 (Keras' progress bar) when stdout is a terminal and 2 (a line per epoch) when not.

    0 prints nothing, 1 Keras' progress bar, 2 one line per epoch.
    """
    if verbose is not None:
        return int(verbose)
    if _verbosity is not None:
        return _verbosity
    stream = sys.stdout
    return 1 if stream is not None and stream.isatty() else 2


def is_start_up_noise(line: str) -> bool:
    """Whether `line` is one of TensorFlow's start-up log lines (see the module docstring)."""
    line = line.strip()
    if not line or line.startswith("WARNING: " + _ABSL_NOTICE) or line == _ABSL_NOTICE:
        return True
    match = _ABSL_LINE.match(line)
    if match is None:
        return False
    level, message = match.groups()
    return level in "IW" or bool(_CUDA_PROBE.search(message))


def _writes_to_fd_2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a StringIO, a closed stream
        return False


@contextlib.contextmanager
def _stderr_captured(lines: list[str]):
    """Append what C and C++ code write to file descriptor 2 to `lines`;
    Python's own `sys.stderr` keeps writing where it did."""
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    if _writes_to_fd_2(python_stderr):
        sys.stderr = open(os.dup(saved), "w", encoding=python_stderr.encoding, errors="replace")
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            if sys.stderr is not python_stderr:
                sys.stderr.close()
                sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines += capture.read().decode("utf-8", "replace").splitlines()


def import_tensorflow_quietly(show_log: bool = False) -> list[str]:
    """Import TensorFlow and list its devices, its start-up lines filtered out.

    With `show_log`, TensorFlow logs everything (TF_CPP_MIN_LOG_LEVEL 0 unless
    set) and nothing is filtered. Otherwise TF_CPP_MIN_LOG_LEVEL defaults to 2
    (errors only) for the rest of the run, and the lines written while
    TensorFlow starts are passed to stderr except its start-up noise
    (`is_start_up_noise`). Returns the lines filtered out.
    """
    if show_log:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        import tensorflow as tf

        tf.config.list_physical_devices()
        return []
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:  # started already: nothing more to filter
        return []
    lines: list[str] = []
    try:
        with _stderr_captured(lines):
            import tensorflow as tf

            # Finding the devices probes CUDA, which logs the cuInit error without a GPU.
            tf.config.list_physical_devices()
    finally:  # what TensorFlow said before failing to start is shown too
        kept, dropped = split_start_up_lines(lines)
        for line in kept:
            print(line, file=sys.stderr)
    return dropped


def split_start_up_lines(lines) -> tuple[list[str], list[str]]:
    """(lines to show, start-up noise) of what TensorFlow wrote while starting; a line
    that is no log line of its own continues the log line before it."""
    kept, dropped = [], []
    continued = False  # the line before was a log line filtered out
    for line in lines:
        log_line = bool(_ABSL_LINE.match(line.strip()))
        noise = is_start_up_noise(line) or (continued and not log_line)
        continued = noise and (log_line or continued)
        (dropped if noise else kept).append(line)
    return kept, dropped
