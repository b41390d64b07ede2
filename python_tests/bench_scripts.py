"""Loading a script of benchmarks/ or scripts/ as a module (they are scripts, not a package) for the CPU tests of
their code."""
import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _exec(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str):
    """``benchmarks/<name>.py`` executed as the module ``bench_<name>``."""
    return _exec(f"bench_{name}", BENCHMARKS / f"{name}.py")


def load_script(name: str):
    """``scripts/<name>.py`` executed as the module ``<name>``."""
    return _exec(name, SCRIPTS / f"{name}.py")
