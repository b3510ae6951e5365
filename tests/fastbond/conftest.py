"""Fixtures of tests/fastbond: the embedded reference model, built once per session.

Every test here sees FASTBOND_CACHE pointing into pytest's temporary directory,
so no test ever writes to (or reuses) the user's ~/.cache/fastbond. The cache
holds the embedded π_ref built from the stored weights (tests/conftest.py)
before any test runs: a test that trains the embedded default without asking
for the fixture finds that build, not one pretrained on this machine.
"""

import pytest


@pytest.fixture(scope="session", autouse=True)
def fastbond_cache(tmp_path_factory, reference_weights):
    """A session-wide cache root for embedded builds, set as $FASTBOND_CACHE, holding the stored π_ref."""
    from fastbond.embedded import build_embedded_reference

    root = tmp_path_factory.mktemp("fastbond-cache")
    build_embedded_reference(root, weights=reference_weights)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTBOND_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def embedded_reference(fastbond_cache):
    """Directory of the embedded π_ref (seed 0), built once for the whole session from the stored weights."""
    from fastbond.embedded import build_embedded_reference

    path = build_embedded_reference()
    assert path.parent == fastbond_cache
    return path


@pytest.fixture(scope="session")
def reference(embedded_reference):
    """(model, tokenizer) of the embedded π_ref, loaded through from_pretrained."""
    from fastbond.embedded import load_reference

    return load_reference(embedded_reference)
