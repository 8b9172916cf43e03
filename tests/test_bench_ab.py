"""bench/ab.py: the renamed copy of an old tree that loads beside this one (python -m bench.ab)."""
import os

from bench import ab


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_renamed_copy_moves_every_name(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _write(src, "sparse_ops/__init__.py", "from .ops import gated_ffn\nimport sparse_ops.ops\n")
    _write(src, "sparse_ops/ops/ffn.py", 'torch.library.register_fake("sparse_ops::gated_ffn")\n'
                                         "op = torch.ops.sparse_ops.gated_ffn\n")
    _write(src, "csrc/ops.cpp", "TORCH_LIBRARY(sparse_ops, m) {}\nnamespace sparse_ops {}\n")
    _write(src, "bench/__main__.py", 'FAMILIES = {"ffn": "bench.ffn"}\nfrom bench import harness\n'
                                     "import bench.ffn\n# a benchmark of sparse_ops_like things\n")
    _write(src, "bench/ffn.py", "import sparse_ops\nfrom sparse_ops import reference\n")
    _write(src, "setup.py", 'ext = "sparse_ops._C"\npackages = ["sparse_ops", "bench"]\n')
    _write(src, "tests/test_x.py", "import sparse_ops\n")
    ab._renamed_copy(src, dst, "rabc")

    def read(rel):
        with open(os.path.join(dst, rel)) as f:
            return f.read()
    assert read("sparse_ops_rabc/__init__.py") == "from .ops import gated_ffn\nimport sparse_ops_rabc.ops\n"
    assert read("sparse_ops_rabc/ops/ffn.py") == ('torch.library.register_fake("sparse_ops_rabc::gated_ffn")\n'
                                                  "op = torch.ops.sparse_ops_rabc.gated_ffn\n")
    assert read("csrc/ops.cpp") == "TORCH_LIBRARY(sparse_ops_rabc, m) {}\nnamespace sparse_ops_rabc {}\n"
    assert read("bench_rabc/__main__.py") == ('FAMILIES = {"ffn": "bench_rabc.ffn"}\nfrom bench_rabc import harness\n'
                                              "import bench_rabc.ffn\n# a benchmark of sparse_ops_like things\n")
    assert read("bench_rabc/ffn.py") == "import sparse_ops_rabc\nfrom sparse_ops_rabc import reference\n"
    assert read("setup.py") == 'ext = "sparse_ops_rabc._C"\npackages = ["sparse_ops_rabc", "bench_rabc"]\n'
    assert not os.path.exists(os.path.join(dst, "tests"))
    assert not os.path.exists(os.path.join(dst, "sparse_ops")) and not os.path.exists(os.path.join(dst, "bench"))
