"""The `prunebench` command: Hydra composes conf/, then the pipeline runs."""

from __future__ import annotations

import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Dict, List

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

# every schema in Hydra's ConfigStore before composition; nothing here imports torch, so a wrong
# option is answered before it loads (the pipeline imports it once the config is checked)
from .config import options  # noqa: F401
from .config import CUBLAS_WORKSPACE, ConfigError, load_config, with_mapping_overrides


@hydra.main(version_base="1.3", config_path="pkg://prunebench.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    config = checked(lambda: load_config(cfg))  # torch-free: a wrong value is answered at once
    from .runs.checkpoint import Interrupted  # torch and the rest load from here on
    from .core.distributed import DistributedError
    from .pipeline import run

    try:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # a SLURM job of several tasks: one run, each task a rank
            from .core.distributed import join_slurm_tasks

            if not join_slurm_tasks().main:
                quiet_console()
        share_machine_with_parallel_jobs(config.device)
        hc = HydraConfig.get()
        group = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None
        summary = checked(lambda: run(config, hc.runtime.output_dir, group))
    except Interrupted as e:  # checkpointed; SLURM (submitit) requeues the job, else the process ends
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped by a signal; to resume: {resume_command()}", file=sys.stderr)
        e.deliver()
    except OSError as e:  # e.g. the disk filled up while writing results
        print(f"error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}; the run stopped, and its "
              f"directory holds no summary.json", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:
        if not lost_ranks(e):
            raise
        if isinstance(e, DistributedError) and os.environ.get("RANK", "0") != "0":
            sys.exit(1)  # every rank raises it; rank 0 says why
        print(f"error: rank {os.environ.get('RANK', '0')}: {lost_ranks(e)}; the run stopped without a summary.json; "
              f"to resume from its last checkpoint: {resume_command()}", file=sys.stderr)
        sys.exit(1)
    final = summary["final"] or {}
    return final.get("test_acc", final.get("test_ppl", float("nan")))


def checked(step):
    """`step()`, or for a user error one line, no traceback, nonzero exit, and no summary.json."""
    try:
        return step()
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # a distributed run's ranks all refuse; rank 0 says why
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def lost_ranks(e: RuntimeError) -> str:
    """What went wrong between the processes of a distributed run, in a few words ("" when `e` is
    something else): the ranks disagree (DistributedError), or a collective lost a process that
    died (gloo: "Connection closed by peer", NCCL: its errors and time-outs)."""
    from .core.distributed import DistributedError, world

    if isinstance(e, DistributedError):
        return str(e)
    text = str(e)
    peer = ("closed by peer", "Connection reset", "Broken pipe", "NCCL", "Socket Timeout", "timed out")
    if world().distributed and (type(e).__name__.startswith("Dist") or any(p in text for p in peer)):
        reason = re.sub(r"^\[[^\]]*\]\s*", "", text.split("This is typically")[0].strip().splitlines()[0])
        return f"lost contact with another process of this run, which died or was killed ({reason[:160]})"
    return ""


def quiet_console() -> None:
    """Ranks > 0: rank 0 prints the run's lines and tables."""
    from .runs import record

    record.CONSOLE.quiet, record.LIVE_PROGRESS = True, False


def resume_command() -> str:
    """The command that resumes this run (or sweep) from its checkpoints."""
    hc = HydraConfig.get()
    args = [a for a in hc.overrides.task if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    if hc.mode == RunMode.MULTIRUN:  # a job knows its own overrides, not the sweep's
        return f"the sweep's command again, with hydra.sweep.dir={hc.sweep.dir}"
    command = ["prunebench"]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # the same torchrun command (any rendezvous options as before)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        nodes = int(os.environ.get("WORLD_SIZE", "1")) // per_node
        command = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []), f"--nproc_per_node={per_node}",
                   "-m", "prunebench"]
    return " ".join([*command, *args, f"hydra.run.dir={hc.runtime.output_dir}"])


def share_machine_with_parallel_jobs(device: str) -> None:
    """Under the local (joblib) launcher: CPUs / n_jobs torch threads per job, no live bars, and
    on a node with several GPUs, job k on GPU k mod (number of GPUs) when `device` is auto or
    cuda (device=cuda:N is kept as asked). Jobs that each take every core run several times
    slower together than one after another; jobs beyond the GPU count share GPUs round-robin."""
    hc = HydraConfig.get()
    if "joblib" not in str(hc.launcher.get("_target_", "")):
        return
    import torch

    from .runs import record

    cpus = os.cpu_count() or 1
    n_jobs = hc.launcher.get("n_jobs") or 1
    jobs = cpus if n_jobs < 0 else min(n_jobs, cpus)
    torch.set_num_threads(max(1, cpus // jobs))
    record.LIVE_PROGRESS = False  # parallel jobs share one terminal
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(int(hc.job.num) % torch.cuda.device_count())  # what device=cuda resolves to


class OutputDirCheck(Callback):
    """An output directory that cannot be written: one line and exit 2, before Hydra's traceback."""

    def on_run_start(self, config, **kwargs) -> None:
        check_writable(Path(str(config.hydra.run.dir)), "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        check_writable(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")


def check_writable(directory: Path, key: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        print(f"error: {key}={directory} cannot be written: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


def config_groups() -> Dict[str, List[str]]:
    """Group -> options, read from the packaged conf/ (hydra/ excluded)."""
    root = resources.files("prunebench.conf")
    return {d.name: sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml"))
            for d in root.iterdir() if d.is_dir() and d.name not in ("hydra", "__pycache__")}


def check_group_choices(argv: List[str]) -> None:
    """`group=option` with an unknown option: one line naming the choices, before Hydra starts."""
    groups = config_groups()
    for arg in argv:
        m = re.fullmatch(r"(?:override\s+)?([\w/]+)=([\w.,\-]+)", arg)
        if not m or m.group(1) not in groups:
            continue  # not a plain group choice (a key=value, a sweep function, a flag)
        group, values = m.group(1), m.group(2).split(",")
        for value in values:
            if value not in groups[group]:
                print(f"error: {group}={value} is not an option; {group} is one of: "
                      f"{', '.join(groups[group])}", file=sys.stderr)
                sys.exit(2)


def compose_config(overrides: List[str], hydra_config: bool = False) -> DictConfig:
    """The config `overrides` compose to (with Hydra's own section when asked), or one line
    naming what is wrong and exit 2."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module="prunebench.conf", version_base="1.3"):
            return compose(config_name="config", overrides=with_mapping_overrides(overrides),
                           return_hydra_config=hydra_config)
    except (HydraException, OmegaConfBaseException) as e:
        noise = ("full_key", "reference_type", "object_type", "To append")
        text = f"{e}\n{e.__cause__ or ''}"  # Hydra's message, then OmegaConf's reason
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(noise)]
        protocol = re.match(r"In 'protocol/(\w+)'", lines[0])
        if protocol:  # a protocol's keys exist only in a language model's dataset (seq_len, last_window)
            print(f"error: protocol={protocol.group(1)} sets how language models are evaluated (dataset.seq_len, "
                  f"calibration, eval.tasks): it needs model=hf_causal_lm and a text dataset (dataset=wikitext2, "
                  f"c4 or text)", file=sys.stderr)
            sys.exit(2)
        print(f"error: {': '.join([lines[0].rstrip('.')] + lines[1:2])}", file=sys.stderr)
        sys.exit(2)


def check_run(overrides: List[str]) -> None:
    """A single run's config, composed and range-checked before Hydra sets up its directory and
    logging (which takes longer): a wrong key or value is one line and exit 2. Sweeps and Hydra's
    flags go to Hydra as they are."""
    if any(a.startswith("-") for a in overrides):
        return
    from omegaconf import open_dict

    cfg = compose_config(overrides, hydra_config=True)
    with open_dict(cfg):
        del cfg["hydra"]
    checked(lambda: load_config(cfg))


def print_help(overrides: List[str]) -> None:
    """Hydra's --help, in a fraction of its time (Hydra composes the config once per group
    option to list the groups; the packaged conf/ folders say the same)."""
    from omegaconf import OmegaConf, open_dict

    cfg = compose_config(overrides, hydra_config=True)
    text = cfg.hydra.help
    with open_dict(cfg):
        del cfg["hydra"]
    groups = "\n".join(f"{group}: {', '.join(names)}" for group, names in sorted(config_groups().items()))
    print(f"{text.header}\n== Configuration groups ==\nCompose your configuration from those groups "
          f"(group=option)\n\n{groups}\n\n\n== Config ==\nOverride anything in the config (foo.bar=value)\n\n"
          f"{OmegaConf.to_yaml(cfg)}\n{text.footer}")


def main() -> None:
    check_group_choices(sys.argv[1:])
    if {"--help", "-h"} & set(sys.argv[1:]):
        print_help([a for a in sys.argv[1:] if a not in ("--help", "-h")])
        return
    check_run(sys.argv[1:])
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # before any CUDA work, for every job
    sys.argv[1:] = with_mapping_overrides(sys.argv[1:]) + rank_overrides(sys.argv[1:])
    try:
        hydra_main()
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """A distributed run ends by leaving its process group (NCCL warns of leaked resources otherwise)."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def rank_overrides(argv: List[str]) -> List[str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group, one run directory for all ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return []
    from .core import distributed

    try:
        overrides = distributed.cli_overrides(argv)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not distributed.world().main:
        quiet_console()
    return overrides


if __name__ == "__main__":
    main()
