"""The environment record every benchmark report carries."""

import sys

import torch

from benchmarks.environment import cpu_info, environment_record, package_version


def test_record_has_the_common_keys_then_the_benchmarks_own():
    env = environment_record(packages=("numpy", "no_such_module_here"), dirty_paths=("codec",), threads=3)
    assert env["python"] == sys.version.split()[0] and env["torch"] == torch.__version__
    assert env["threads"] == 3 and env["no_such_module_here"] is None
    assert env["numpy"] == __import__("numpy").__version__
    assert set(env["cpu"]) >= {"model", "logical_cpus", "torch_cpu_capability", "avx2", "native_bf16"}
    assert "git_commit" in env and "git_dirty" in env


def test_git_dirty_only_when_asked():
    assert "git_dirty" not in environment_record()


def test_cpu_info_and_versions():
    assert cpu_info()["logical_cpus"] >= 1
    assert package_version("torch") == torch.__version__
    assert package_version("no_such_module_here") is None
