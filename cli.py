"""What every command-line script shares: the one error path and the common flags."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from errors import ProjectError

DEFAULT_MODEL = "vit_base_patch16_224_in21k"
# The exit status after Ctrl-C (128 + SIGINT, as a shell reports it); train.main returns it,
# and the scripts that call train.main in-process stop on it.
INTERRUPTED_STATUS = 130
# After SIGTERM (Slurm, docker stop, `timeout`), 128 + 15: train.main returns it as well.
TERMINATED_STATUS = 128 + signal.SIGTERM


def _interrupted_while_importing(signum: int, frame: object) -> None:
    print("\nInterrupted.", file=sys.stderr)
    raise SystemExit(INTERRUPTED_STATUS)


def quiet_ctrl_c_while_importing() -> None:
    """Ctrl-C exits 130 with one line, no traceback, until run_main takes over.

    For a script's ``if __name__ == "__main__":`` block above its heavy imports: torch
    takes seconds to import, and Python's own handler would print a KeyboardInterrupt
    traceback from deep inside it. A Ctrl-C that was ignored (nohup) stays ignored.
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_importing)


def run_main(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Call run(args); a ProjectError becomes one ``error:`` line on stderr and its exit code,
    Ctrl-C exit 130 without a traceback."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_importing:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # run() handles Ctrl-C
    try:
        status = run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except ProjectError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return INTERRUPTED_STATUS
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do, with the status of
        # a process ended by SIGPIPE; what is left to print goes to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE (13), as a shell reports it


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda:0",
                        help="cuda:N, cpu or mps (default: %(default)s; the CPU when CUDA is "
                             "absent)")


def add_model_name_flag(parser: argparse.ArgumentParser,
                        purpose: str = "architecture, for weights that do not name it") -> None:
    from vit_model import list_models

    parser.add_argument("--model-name", default=DEFAULT_MODEL, choices=list_models(),
                        metavar="NAME",
                        help=f"{purpose} (default: %(default)s), one of: "
                             f"{', '.join(list_models())}")


def add_weights_flags(parser: argparse.ArgumentParser) -> None:
    """--weights, --class-indices and --model-name, for the scripts that read a trained model."""
    from checkpoints import BEST_FILE, CLASS_INDICES_FILE, DEFAULT_OUTPUT_DIR, EPOCH_FILES

    parser.add_argument("--weights", default=None,
                        help="checkpoint, or any weights file or Hugging Face folder that "
                             f"weights.py reads (default: {BEST_FILE} in ./{DEFAULT_OUTPUT_DIR}, "
                             f"else the newest {EPOCH_FILES} there)")
    parser.add_argument("--class-indices", default=None,
                        help=f"{CLASS_INDICES_FILE}, needed only for weights that do not name "
                             "their classes (default: beside the weights, else ./)")
    add_model_name_flag(parser)
