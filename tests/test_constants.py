"""The one cache folder: ``$REGPROXY_CACHE`` for everything regproxy keeps, the old ``$REGPROXY_CACHE_DIR`` spelling
still honoured for one release with a FutureWarning."""

import warnings

import pytest

from regproxy_cli.constants import CACHE_ENV, DEPRECATED_CACHE_ENV, cache_dir


def test_cache_dir_is_regproxy_cache_else_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(DEPRECATED_CACHE_ENV, str(tmp_path / "old"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name wins, silently
        assert cache_dir() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.delenv(DEPRECATED_CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "regproxy"


def test_the_old_spelling_still_works_with_a_deprecation(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv(DEPRECATED_CACHE_ENV, str(tmp_path))
    with pytest.warns(FutureWarning, match=r"\$REGPROXY_CACHE_DIR is deprecated: set \$REGPROXY_CACHE instead"):
        assert cache_dir() == tmp_path


def test_the_zoo_and_the_cpu_kernel_choices_share_it(monkeypatch, tmp_path):
    from regproxy_cli.hub import zoo
    from regproxy_cli.model import attention

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert zoo.authors_checkpoint_path(zoo.ZOO["s16-ade"]) == tmp_path / "authors" / "s16-ade.pth"
    assert attention.cache_dir is zoo.cache_dir is cache_dir
