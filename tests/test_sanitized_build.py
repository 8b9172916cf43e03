"""Under .ci/sanitize.sh (SPARSE_OPS_EXPECT_SANITIZED=1): the extension loaded is the instrumented
one, so a green sanitizer job means the tests ran against ASan + UBSan, not the normal build."""
import os

import pytest

import sparse_ops


@pytest.mark.skipif(os.environ.get("SPARSE_OPS_EXPECT_SANITIZED") != "1", reason="only in the sanitizer job")
def test_the_instrumented_extension_is_loaded():
    from sparse_ops import backend
    path = backend._C.__file__
    assert "build/sanitize/pkg" in path, path
    with open(path, "rb") as f:
        assert b"__asan_report" in f.read(), f"{path} is not built with AddressSanitizer"
    assert sparse_ops.__file__.startswith(os.path.dirname(os.path.dirname(path)))
