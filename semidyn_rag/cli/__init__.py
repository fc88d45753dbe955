"""The ``semidyn-rag`` command: one subcommand per module in this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func`` to the function that runs it (returning an exit code). Modules are imported lazily
by name so that ``semidyn-rag --help`` does not import torch.

``main`` is also the one place that turns failures into clean errors: a known error (a damaged
corpus, store or checkpoint, a full disk, a missing file) prints one ``semidyn-rag: error:``
line naming the file and the problem and exits 1; Ctrl-C and SIGTERM print one line saying to
rerun the same command to resume, and exit 130 / 143. Every writer commits or renames atomically,
so an interrupted command leaves nothing half-written. ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import math
import re
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path

# subcommand -> module under semidyn_rag.cli
SUBCOMMANDS = {
    "precompress": "precompress",
    "fit-scale": "fit_scale",
    "query": "query",
    "repair": "repair",
    "synth": "synth",
    "train": "train",
    "eval": "evaluate",
    "import-latents": "import_latents",
    "export": "export",
    "export-decoder": "export_decoder",
}
PROG = "semidyn-rag"
RESUME = "rerun the same command to resume"
# errors a command may raise that need no traceback: (module, class name); looked up only in
# modules already imported (an error cannot come from a module that was never loaded)
KNOWN_ERRORS = (
    ("semidyn_rag.corpus.directory", "CorpusError"),
    ("semidyn_rag.store.sqlite", "StoreError"),
    ("semidyn_rag.checkpoint", "CheckpointError"),
    ("semidyn_rag.checkpoint.errors", "CheckpointError"),
    ("semidyn_rag.evaluation.errors", "EvalError"),
    ("semidyn_rag.evaluation.datasets", "DatasetError"),
    ("semidyn_rag.training.records", "RecordError"),
    ("semidyn_rag.training.teachers", "TeacherError"),
    ("semidyn_rag.distributed", "RayUnavailableError"),
    ("semidyn_rag.serving.base", "ServingError"),
    ("yaml", "YAMLError"),
)


# -- argument types shared by the subcommands ---------------------------------------------------

# argparse takes "-1e9", "-inf" or "-2:4:0.5" for unknown options (its negative-number test knows
# only plain numbers); parsers with numeric options widen it with ``allow_negative_values``.
NEGATIVE_VALUE = re.compile(r"^-(\.?\d[\d.:,eE+-]*|inf(inity)?|nan)$", re.IGNORECASE)


def allow_negative_values(parser: argparse.ArgumentParser) -> None:
    """Let ``--scale -1e9`` (or ``-inf``, refused later with a clear message) reach the option."""
    parser._negative_number_matcher = NEGATIVE_VALUE



def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def scale_arg(text: str) -> float:
    """argparse type of ``--scale``: any finite number (large ones clamp to the coarsest factor)."""
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r} "
                                         "(NaN and infinity select no factor)")
    return value


def ratio_arg(text: str) -> float:
    """argparse type of ``--target-ratio``: a finite number above 1 (tokens per latent)."""
    value = _number(text)
    if not math.isfinite(value) or value <= 1:
        raise argparse.ArgumentTypeError(f"must be a finite number above 1 (tokens per latent), got {text!r}")
    return value


def folder_arg(text: str) -> str:
    """argparse type of an output folder: anything but an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file, not a folder; choose another path")
    if any(p.exists() and not p.is_dir() for p in path.absolute().parents):
        raise argparse.ArgumentTypeError(f"{text} lies under a file, not a folder; choose another path")
    return text


def text_arg(text: str) -> str:
    """argparse type of a question: not empty or only whitespace."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; ask a question")
    return text


def fail(message: str, code: int = 1) -> int:
    """Print ``semidyn-rag: error: message`` to stderr; return the exit code (for ``return fail(...)``)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def add_trust_remote_code(parser: argparse.ArgumentParser) -> None:
    """The ``--trust-remote-code`` flag of commands that load a compressor."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the base models run Python code shipped with them (auto_map); only for "
                             "models you trust. A checkpoint can never turn this on by itself")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--backend`` and ``--vllm-url`` flags of commands that decode answers."""
    parser.add_argument("--backend", choices=("transformers", "vllm"), default=None,
                        help="who decodes: transformers (default), or vllm (an engine in this process, which needs "
                             "vLLM installed, or the server at --vllm-url)")
    parser.add_argument("--vllm-url", default=None,
                        help="a `vllm serve MODEL --enable-prompt-embeds` server, e.g. http://gpu-host:8000 "
                             "(implies --backend vllm; serve the folder `semidyn-rag export-decoder` writes)")


def backend_choice(args: argparse.Namespace) -> tuple[str, str | None]:
    """(backend name, server URL) from ``--backend``/``--vllm-url`` (a URL alone means vllm)."""
    url = getattr(args, "vllm_url", None)
    name = getattr(args, "backend", None) or ("vllm" if url else "transformers")
    if url and name != "vllm":
        raise argparse.ArgumentTypeError("--vllm-url needs --backend vllm")
    return name, url


def compressor_overrides(args: argparse.Namespace, device: str | None = None) -> dict:
    """Config overrides for ``SemiDynamicCompressor.from_pretrained`` from the common options.

    ``trust_remote_code`` is passed only when the user asked for it, with a warning, so that
    the caller's explicit choice is the only way remote code gets enabled.
    """
    overrides: dict = {"device": device} if device else {}
    if getattr(args, "trust_remote_code", False):
        print(f"{PROG}: warning: --trust-remote-code: Python files shipped with the base models will run "
              "with your permissions; use it only for models you trust", file=sys.stderr)
        overrides["trust_remote_code"] = True
    return overrides


# -- the dispatcher -----------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that rollbacks and ``finally`` blocks run."""


@contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe_error(e: BaseException) -> str | None:
    """One line for a known failure (what and where, and what to do), or None for a bug."""
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            full = _loaded("semidyn_rag.atomic", "DiskFullError")
            if full is not None and isinstance(e, full):  # it says what was saved
                return str(e)
            where = f" writing {e.filename}" if e.filename else ""
            return (f"no space left on the device{where}; nothing half-written was kept: "
                    f"free some space and {RESUME}")
        if e.strerror and e.filename:
            return f"{e.filename}: {e.strerror}"
        return str(e) or type(e).__name__
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(e, pydantic.ValidationError):
        return "invalid settings: " + "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors()[:5])
    for module, name in KNOWN_ERRORS:
        cls = _loaded(module, name)
        if cls is not None and isinstance(e, cls):
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            return "; ".join(lines) or type(e).__name__
    return None


def _loaded(module: str, name: str):
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see: semidyn-rag {name} --help)")
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise
            continue  # subcommand not part of this build
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _sigterm_raises():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; finished work is kept: {RESUME}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM); finished work is kept: {RESUME}", file=sys.stderr)
        return 143
    except Exception as e:
        message = describe_error(e)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
