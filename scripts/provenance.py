"""What every figure the scripts of this folder record into ``results/`` carries besides its value: the commit of
the code, the machine and the versions that produced it."""
import json
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def machine() -> str:
    """'x86_64, 2 CPU cores, no GPU' (or the GPU's name)."""
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'
    return f'{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}'


def versions() -> str:
    import mqbench
    import torch
    return (f'torch {torch.__version__}, mqbench-torch2 {getattr(mqbench, "__version__", "0.1.1")}, '
            f'Python {platform.python_version()}')


def write_record(path: str, record: dict) -> None:
    with open(path, 'w') as f:
        json.dump(record, f, indent=2)
        f.write('\n')
