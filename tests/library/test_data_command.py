"""Getting Omniglot: the data rule, ``python -m msr.data.omniglot`` (download from a local
server, convert, verify), and the few-shot driver without data. No test touches the network."""

import functools
import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import FIXTURE_NPZ, FIXTURE_OMNIGLOT, REPO_ROOT

from msr.data import find_omniglot, load_omniglot
from msr.data.locations import cache_folder, data_roots
from msr.data.omniglot import build

ZIPS = FIXTURE_OMNIGLOT / "zips"


def _command(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "msr.data.omniglot", *map(str, args)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_the_data_rule_looks_in_msr_data_then_the_cache_then_the_callers_roots(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MSR_DATA")
    assert cache_folder() == tmp_path / "cache" / "msr"
    assert data_roots([tmp_path / "extra"]) == [tmp_path / "cache" / "msr", tmp_path / "extra"]
    with pytest.raises(FileNotFoundError) as missing:
        find_omniglot([tmp_path / "extra"])
    assert str(tmp_path / "cache" / "msr" / "omniglot") in str(missing.value)
    assert "python -m msr.data.omniglot download" in str(missing.value)
    assert find_omniglot([FIXTURE_OMNIGLOT.parent]) == FIXTURE_NPZ  # the caller's root
    monkeypatch.setenv("MSR_DATA", str(FIXTURE_OMNIGLOT.parent))
    assert data_roots()[0] == FIXTURE_OMNIGLOT.parent and find_omniglot() == FIXTURE_NPZ


def test_convert_makes_the_array_file_the_loader_reads_from_the_original_drawings(tmp_path):
    written = build.convert(ZIPS, tmp_path, expected=None)  # a subset: no reference hash
    assert written == tmp_path / "omniglot" / "omniglot_28x28_lanczos.npz"
    ours, fixture = (load_omniglot(p, "background") for p in (written, FIXTURE_NPZ))
    for name in ours.names:  # the same pixels as the reference conversion, to the bit
        index = fixture.names.index(name)
        assert np.array_equal(ours.images[ours.names.index(name)], fixture.images[index])
    assert load_omniglot(written, "evaluation").names == ("Angelic/character01",)
    lists = tmp_path / "omniglot" / "splits" / "vinyals"
    assert (lists / "trainval.txt").read_text() == (lists / "train.txt").read_text() + (
        lists / "val.txt"
    ).read_text()
    assert (tmp_path / "omniglot" / "LICENSE").read_text().startswith("The MIT License")


def test_the_command_verifies_and_says_how_to_place_the_files_by_hand(tmp_path):
    done = _command("convert", ZIPS, "--root", tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "do not match the reference Omniglot" in line and build.SOURCE in line
    assert "python -m msr.data.omniglot convert FOLDER" in line
    assert not (tmp_path / "omniglot" / "omniglot_28x28_lanczos.npz").exists()


def test_download_from_a_local_server_and_without_a_network(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ZIPS))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with pytest.raises(build.OmniglotDataError, match="do not match the reference"):
            build.download(tmp_path, source=url)  # fetched, converted, verified: a subset
        assert (tmp_path / "omniglot" / "downloads" / "images_background.zip").read_bytes() == (
            ZIPS / "images_background.zip"
        ).read_bytes()
    finally:
        server.shutdown()
        server.server_close()  # refused from now on (a bound socket would wait out the timeout)
    closed = _command("download", "--root", tmp_path, env={"MSR_OMNIGLOT_URL": url})
    assert closed.returncode == 1
    (line,) = closed.stderr.strip().splitlines()
    assert "could not download" in line and "images_evaluation.zip yourself" in line


def test_the_command_has_help_and_says_where_it_looks():
    assert _command("--help").returncode == 0
    where = _command("where")
    assert where.returncode == 0 and f"found {FIXTURE_NPZ}" in where.stdout


def test_the_few_shot_driver_without_data_is_one_line_naming_the_command(tmp_path):
    environment = {"MSR_DATA": str(tmp_path / "empty"), "HOME": str(tmp_path / "home")}
    environment["XDG_CACHE_HOME"] = ""
    done = subprocess.run(
        [sys.executable, "-m", "experiments.few_shot", "--method", "msr", "--preset", "tiny",
         "--out", str(tmp_path / "run")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **environment},
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "error:" in line]
    assert "no Omniglot data in" in line and "python -m msr.data.omniglot download" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.full_data
def test_converting_the_standard_zips_reproduces_the_reference_arrays(full_omniglot, tmp_path):
    """The conversion the drivers' data came from, checked end to end (about 30 s)."""
    layout = full_omniglot / "standard_layout"
    if not layout.is_dir():
        pytest.skip(f"no standard-layout zips in {full_omniglot}")
    written = build.convert(layout, tmp_path)  # verified against build.ARRAYS_SHA256
    with np.load(written) as ours, np.load(full_omniglot / "omniglot_28x28_lanczos.npz") as ref:
        assert np.array_equal(ours["images"], ref["images"])
