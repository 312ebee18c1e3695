"""Wheels of prunebench's dependencies that a GPU machine's image lacks, for a machine without network.

    python3 scripts/gpu_wheels.py fetch [--dir .whl]     where PyPI is reachable (gpu_check.sh --fetch-wheels)
    python3 scripts/gpu_wheels.py install --target DIR   on the GPU machine, with its own python3

`fetch` downloads exactly the packages in MISSING (no dependencies), each as a wheel for the GPU
machine's interpreter (CPython 3.12, manylinux x86-64 by default): a pure-Python one as
py3-none-any, a compiled one for cp312. A project that publishes only a source archive
(antlr4-python3-runtime 4.9.3) is built here into a wheel, which must come out pure Python.
Wheels in the folder that are not in the list are removed (two versions of one project would
both be installed), and the folder is added to .git/info/exclude so that git ignores it; the
device tool sends it along when a call names it in `carry`.

`install` leaves the image alone: a package that the interpreter running this script already
imports is not installed (whatever its version); each missing one is installed on its own with
`pip install --no-index --no-deps --target DIR`, so one failure does not stop the others, and is
then imported from DIR in a fresh process. Every requirement of what was installed is checked
against what the interpreter has. The last lines are one row per package; the exit status is 0
unless the folder holds no wheel at all: the checks that need a missing package say so themselves.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

# What the GPU image lacks (the image: Python 3.12, torch 2.11, transformers 5.17, see README "On a
# GPU"), at the versions this project's own environment uses. datasets is imported by every
# language-model run (prunebench.lm: its progress bars and its version in summary.json), so it comes
# along with the two pure-Python packages it needs beyond the image's (pyarrow and xxhash are there).
# wandb, submitit and the Hydra launcher plugins are left out: no GPU check uses them.
MISSING = [
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "antlr4-python3-runtime==4.9.3",
    "torch-pruning==1.6.1",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
]
# Requirements of the wheels above that the image is known to satisfy (what was read off it:
# /work/.library/device/KINDS.md); anything else a wheel requires must be in MISSING.
IMAGE_HAS = {"torch", "numpy", "packaging", "pyyaml", "pyarrow", "xxhash", "pandas", "filelock", "tqdm", "fsspec",
             "huggingface-hub", "requests", "httpx"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
CARRY_LIMIT = 64 * 2 ** 20  # the device tool sends at most this much: working tree and carried paths together


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_project(path: Path) -> Tuple[str, str]:
    """(canonical project name, version) from a wheel's file name."""
    parts = path.name[:-len(".whl")].split("-")
    return canonical(parts[0]), parts[1]


def wheel_tags(path: Path) -> str:
    return "-".join(path.name[:-len(".whl")].split("-")[-3:])


def wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return email.parser.Parser().parsestr(z.read(name).decode("utf-8"))


def import_names(path: Path) -> List[str]:
    """The top-level modules a wheel installs (from its RECORD: folders and .py files at the top)."""
    with zipfile.ZipFile(path) as z:
        tops = set()
        for n in z.namelist():
            head = n.split("/")[0]
            if head.endswith((".dist-info", ".data")):
                continue
            if "/" in n:
                tops.add(head)
            elif n.endswith(".py"):
                tops.add(n[:-3])
    return sorted(tops)


def requirements(path: Path, python_version: str) -> List[str]:
    """The wheel's Requires-Dist that apply on Linux with this Python, extras left out."""
    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": python_version + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    out = []
    for line in wheel_metadata(path).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            out.append(line)
    return out


def human(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.0f} KiB"


# ------------------------------------------------------------------------------------------ fetch
def pip_download(spec: str, dest: Path, python_version: str) -> subprocess.CompletedProcess:
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi,
           "--abi", "none", "--abi", "abi3", "-d", str(dest), spec]
    for p in PLATFORMS:
        cmd[-1:-1] = ["--platform", p]
    return subprocess.run(cmd, capture_output=True, text=True)


def pip_build(spec: str, dest: Path) -> subprocess.CompletedProcess:
    """A wheel built here from the source archive (for projects that publish no wheel)."""
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                           "--no-binary", canonical(spec.split("==")[0]), "-w", str(dest), spec],
                          capture_output=True, text=True)


def exclude_from_git(folder: Path) -> None:
    """Add /<folder>/ to .git/info/exclude (git then ignores it; the device tool carries it on request)."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel", "--git-path", "info/exclude"], capture_output=True,
                         text=True, cwd=folder.parent)
    if top.returncode != 0:
        return
    root, exclude = top.stdout.splitlines()
    exclude_path = Path(exclude) if Path(exclude).is_absolute() else folder.parent / exclude
    try:
        rel = folder.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return
    line = f"/{rel.as_posix()}/"
    existing = exclude_path.read_text().splitlines() if exclude_path.exists() else []
    if line not in existing:
        exclude_path.parent.mkdir(parents=True, exist_ok=True)
        with exclude_path.open("a") as f:
            f.write(("\n" if existing and existing[-1] else "") + line + "\n")
        print(f"added {line} to {exclude_path} (git ignores the wheels; name the folder in the device tool's carry)")


def fetch(folder: Path, python_version: str) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    exclude_from_git(folder)
    wanted = {canonical(s.split("==")[0]): s.split("==")[1] for s in MISSING}
    for w in folder.glob("*.whl"):  # leftovers: other projects, other versions
        project, version = wheel_project(w)
        if wanted.get(project) != version:
            w.unlink()
            print(f"removed {w.name} (not in the list)")
    failed = []
    for spec in MISSING:
        project, version = canonical(spec.split("==")[0]), spec.split("==")[1]
        if any(wheel_project(w) == (project, version) for w in folder.glob("*.whl")):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            got = pip_download(spec, Path(tmp), python_version)
            how = "downloaded"
            if got.returncode != 0:  # no wheel for that Python: build one if it is pure Python
                got, how = pip_build(spec, Path(tmp)), "built from its source archive"
            wheels = list(Path(tmp).glob("*.whl"))
            if got.returncode != 0 or len(wheels) != 1:
                why = (got.stderr.strip().splitlines() or ["no wheel came out"])[-1]
                failed.append(f"{spec}: {why}")
                continue
            wheel = wheels[0]
            if how.startswith("built") and not wheel_tags(wheel).endswith("none-any"):
                failed.append(f"{spec}: no wheel for Python {python_version} on PyPI, and the one built here "
                              f"({wheel.name}) is compiled for this machine, not the GPU machine")
                continue
            shutil.move(str(wheel), folder / wheel.name)
            print(f"{how}: {wheel.name}")
    wheels = sorted(folder.glob("*.whl"))
    have = {wheel_project(w)[0] for w in wheels}
    unmet = []
    for w in wheels:
        from packaging.requirements import Requirement

        for line in requirements(w, python_version):
            name = canonical(Requirement(line).name)
            if name not in have and name not in IMAGE_HAS:
                unmet.append(f"{w.name} requires {line}: neither in the list nor known to be on the GPU image")
    total = sum(w.stat().st_size for w in wheels)
    print(f"\n{'wheel':64} {'size':>10}")
    for w in wheels:
        print(f"{w.name:64} {human(w.stat().st_size):>10}")
    print(f"{'total (' + str(len(wheels)) + ' wheels)':64} {human(total):>10}")
    for line in unmet:
        print("gpu_wheels: warning:", line)
    if total > CARRY_LIMIT // 2:
        print(f"gpu_wheels: warning: {human(total)} of wheels leaves little of the device tool's "
              f"{human(CARRY_LIMIT)} for the working tree")
    for line in failed:
        print("gpu_wheels: FAILED", line, file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------- install
def importable(names: List[str], path: Optional[Path] = None) -> Tuple[bool, str]:
    """Whether a fresh interpreter imports every module (with `path` first on sys.path); the error if not."""
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env)
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


def install_one(wheel: Path, target: Path) -> Tuple[bool, str]:
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                        "--no-deps", "--no-compile", "--no-cache-dir", "--target", str(target), str(wheel)],
                       capture_output=True, text=True)
    if r.returncode == 0:
        return True, ""
    if "No module named pip" in r.stderr:  # an interpreter without pip: a pure wheel is a zip to unpack
        if wheel_tags(wheel).endswith("none-any"):
            with zipfile.ZipFile(wheel) as z:
                if not any(n.split("/")[0].endswith(".data") for n in z.namelist()):
                    z.extractall(target)
                    return True, ""
        return False, "this interpreter has no pip, and the wheel is not a plain pure-Python one"
    return False, (r.stderr.strip().splitlines() or ["pip failed"])[-1]


def installed_version(project: str, target: Optional[Path]) -> Optional[str]:
    paths = [str(target)] + sys.path if target is not None else sys.path
    for dist in md.distributions(path=paths):
        if canonical(dist.metadata["Name"] or "") == project:
            return dist.version
    return None


def install(folder: Path, target: Path) -> int:
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"gpu_wheels: no wheels in {folder}/: run 'bash scripts/gpu_check.sh --fetch-wheels' where PyPI "
              f"is reachable, and carry the folder", file=sys.stderr)
        return 1
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    rows = []
    installed = []
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for w in wheels:
        project, version = wheel_project(w)
        try:
            names = import_names(w)
            requirements(w, python_version)
        except (zipfile.BadZipFile, StopIteration, ValueError, UnicodeDecodeError) as e:
            rows.append((project, f"FAILED: {w.name} is not a readable wheel ({type(e).__name__}: {e})"))
            continue
        ok, _ = importable(names)
        if ok:
            have = installed_version(project, None)
            note = "" if have == version else f" (the wheel is {version})"
            rows.append((project, f"already here, {have or 'version unknown'}{note}: left as it is"))
            continue
        done, why = install_one(w, target)
        if not done:
            rows.append((project, f"FAILED to install {version}: {why}"))
            continue
        installed.append(w)
        rows.append((project, f"installed {version} into {target}"))
    # imports after all are in (a package may import another one of the set)
    from packaging.requirements import Requirement

    for i, (project, text) in enumerate(rows):
        w = next((w for w in installed if wheel_project(w)[0] == project), None)
        if w is None:
            continue
        ok, why = importable(import_names(w), target)
        unmet = []
        for line in requirements(w, python_version):
            req = Requirement(line)
            have = installed_version(canonical(req.name), target)
            if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                unmet.append(f"{req} (here: {have or 'none'})")
        text += "" if ok else f"; FAILED to import: {why}"
        text += f"; unmet requirements: {', '.join(unmet)}" if unmet else ""
        rows[i] = (project, text)
    print(f"\n{'package':26} result ({sys.executable}, Python {python_version})")
    for project, text in rows:
        print(f"{project:26} {text}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download the missing packages' wheels (where PyPI is reachable)")
    f.add_argument("--dir", type=Path, default=Path(".whl"))
    f.add_argument("--python-version", default="3.12", help="of the GPU machine's interpreter (default 3.12)")
    i = sub.add_parser("install", help="install the wheels this interpreter lacks into --target")
    i.add_argument("--dir", type=Path, default=Path(".whl"))
    i.add_argument("--target", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "fetch":
        return fetch(args.dir, args.python_version)
    return install(args.dir, args.target)


if __name__ == "__main__":
    sys.exit(main())
