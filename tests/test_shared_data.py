"""One decoded dataset per machine (issue 14, hpo.shared_data): trainer processes decode once and
map the same memory; a process killed while decoding or writing leaves nothing half-made that
another would map; a sweep removes exactly the entries no live process maps; a folder that cannot
take the data leaves it private. GPU memory sizing counts every slot sharing the GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_env

from hpo import shared_data
from hpo.launcher import SLOTS_ENV, Slot, child_env, device_memory_budget, plan_slots
from hpo.shared_data import load_shared, shared_data_dir, sweep_unused

# A process that loads key KEY from FOLDER, counting its builds in FOLDER/../builds, and prints
# the sum of the tensor and whether the tensor is mapped from the shared folder.
LOADER = """
import os, sys, time
from pathlib import Path
import torch
from hpo.shared_data import load_shared

folder, key, sleep_s = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])

def build():
    with open(folder.parent / "builds", "a") as out:
        out.write(f"{os.getpid()}\\n")
    time.sleep(sleep_s)
    x = torch.arange(1_000_000, dtype=torch.int64).view(1000, 1000)
    return {"x": x, "none": None, "empty": torch.empty((3, 0, 0, 0), dtype=torch.uint8)}, {"classes": ["a", "b"]}

tensors, meta, lease = load_shared(folder, key, build)
maps = Path("/proc/self/maps").read_text()
print(int(tensors["x"].sum()), meta["classes"], lease is not None, str(folder) in maps, tensors["none"] is None,
      tuple(tensors["empty"].shape), flush=True)
if len(sys.argv) > 4:  # hold the lease until told to stop
    sys.stdin.readline()
"""

EXPECTED_SUM = 999_999 * 1_000_000 // 2


def _loader(folder: Path, key: str, sleep_s: float = 0.0, hold: bool = False) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", LOADER, str(folder), key, str(sleep_s)] + (["hold"] if hold else [])
    return subprocess.Popen(
        args, env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _builds(folder: Path) -> int:
    path = folder.parent / "builds"
    return len(path.read_text().split()) if path.exists() else 0


def test_processes_loading_together_decode_once_and_map_the_same_copy(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    loaders = [_loader(folder, "k1", sleep_s=1.0) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in loaders]
    for (out, err), p in zip(outputs, loaders, strict=True):
        assert p.returncode == 0, err
        assert out.split()[:1] == [str(EXPECTED_SUM)]
        assert "True True True (3, 0, 0, 0)" in out  # leased, mapped from the folder, None and empty kept
    assert _builds(folder) == 1


def test_a_builder_killed_mid_way_leaves_nothing_mapped_and_the_next_one_builds(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    victim = _loader(folder, "k2", sleep_s=60.0)
    deadline = time.monotonic() + 60
    while _builds(folder) == 0:  # it holds the writer's lock and is decoding
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiting = _loader(folder, "k2")  # queued behind the writer's lock
    time.sleep(0.5)
    assert waiting.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert out.split()[0] == str(EXPECTED_SUM)
    assert _builds(folder) == 2  # the killed build, then the waiting process's own


def test_a_half_written_or_truncated_entry_is_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    calls: list[int] = []

    def build() -> tuple[dict[str, torch.Tensor | None], dict[str, object]]:
        calls.append(1)
        return {"x": torch.arange(10, dtype=torch.float32)}, {}

    tensors, _, lease = load_shared(folder, "k3", build)
    assert lease is not None
    entry = lease.entry
    lease.close()
    del tensors
    # What a writer killed mid-way leaves, and a data file cut short (a disk folder after a crash).
    (folder / f"{entry.name}.building-999999").mkdir()
    (folder / f"{entry.name}.building-999999" / "x.bin").write_bytes(b"\0" * 7)
    (entry / "x.bin").write_bytes((entry / "x.bin").read_bytes()[:20])
    tensors, _, lease = load_shared(folder, "k3", build)
    assert len(calls) == 2
    assert torch.equal(tensors["x"], torch.arange(10, dtype=torch.float32))  # type: ignore[arg-type]
    assert not list(folder.glob("*.building-*"))


def test_a_mapped_copy_is_private_to_its_process(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    first, _, _ = load_shared(folder, "k4", lambda: ({"x": torch.zeros(4)}, {}))
    first["x"][0] = 7.0  # type: ignore[index]
    second, _, _ = load_shared(folder, "k4", lambda: ({"x": torch.ones(4)}, {}))
    assert second["x"].tolist() == [0.0, 0.0, 0.0, 0.0]  # type: ignore[union-attr]


def test_the_sweep_removes_only_entries_no_process_maps(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    holder = _loader(folder, "held", hold=True)
    assert holder.stdout is not None
    assert holder.stdout.readline().split()[0] == str(EXPECTED_SUM)
    _, _, lease = load_shared(folder, "free", lambda: ({"x": torch.zeros(4)}, {}))
    assert lease is not None
    unused = lease.entry
    lease.close()
    (folder / "deadbeef.building-42").mkdir()
    (folder / "deadbeef.lock").touch()
    removed = sweep_unused(folder)
    assert unused in removed and not unused.exists()
    assert not (folder / "deadbeef.building-42").exists()
    entries = [p for p in folder.iterdir() if p.is_dir()]
    assert len(entries) == 1  # the held one
    holder.communicate("stop\n", timeout=60)
    assert sweep_unused(folder) == entries
    assert not [p for p in folder.iterdir() if p.is_dir()]


def test_a_folder_too_small_keeps_the_data_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "shared"

    class Tiny:
        free = 1000

    monkeypatch.setattr(shared_data.shutil, "disk_usage", lambda path: Tiny())
    tensors, meta, lease = load_shared(folder, "big", lambda: ({"x": torch.zeros(10_000)}, {"a": 1}))
    assert lease is None and meta == {"a": 1} and tensors["x"] is not None
    assert not [p for p in folder.iterdir() if p.is_dir()]


def test_a_folder_other_users_can_write_is_not_used(tmp_path: Path) -> None:
    """Whoever can write the folder could plant tensors that every trainer would map."""
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    tensors, _, lease = load_shared(folder, "k5", lambda: ({"x": torch.ones(3)}, {}))
    assert lease is None and tensors["x"] is not None
    assert list(folder.iterdir()) == []


def test_a_shared_data_path_that_is_a_file_keeps_the_data_private_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mistyped HPO_SHARED_DATA (a file, not a folder) must not fail the trial."""
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("x")
    with caplog.at_level("WARNING", logger="hpo.shared_data"):
        tensors, meta, lease = load_shared(not_a_folder, "k6", lambda: ({"x": torch.ones(2)}, {"a": 1}))
    assert lease is None and meta == {"a": 1} and tensors["x"] is not None
    assert str(not_a_folder) in caplog.text and "keeping this one private" in caplog.text
    assert not_a_folder.read_text() == "x"


def test_the_folder_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HPO_SHARED_DATA", "none")
    assert shared_data_dir() is None
    monkeypatch.setenv("HPO_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path / f"hpo-data-{os.getuid()}"
    monkeypatch.delenv("HPO_SHARED_DATA")
    assert shared_data_dir() == Path(f"/dev/shm/hpo-data-{os.getuid()}")


def test_image_data_is_shared_by_workers_and_decoded_anew_when_the_dataset_changes(tmp_path: Path) -> None:
    """Two trainer-like processes load the same synthetic ImageFolder: the second maps the first's
    copy; after an image changes on disk, the data is decoded again, not served stale."""
    from synthetic_data import make_imagefolder

    root = make_imagefolder(tmp_path / "data", classes=3, per_class=6, size=(12, 12), ext="png")
    folder = tmp_path / "shared"
    code = (
        "import sys; from pathlib import Path; from objectives.vision.data import DataConfig, load_image_data;"
        "d = load_image_data(DataConfig(format='imagefolder', root=sys.argv[1], image_size=8), seed=0);"
        "print(int(d.train_images.sum()), d.lease is not None, sys.argv[2] in Path('/proc/self/maps').read_text())"
    )
    env = cli_env({"HPO_SHARED_DATA": str(folder)})

    def load() -> list[str]:
        result = subprocess.run(
            [sys.executable, "-c", code, str(root), str(folder)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    first = load()
    assert first[1:] == ["True", "True"]
    (entry,) = [p for p in (folder / f"hpo-data-{os.getuid()}").iterdir() if p.is_dir()]
    assert load() == first
    assert [p for p in entry.parent.iterdir() if p.is_dir()] == [entry]  # mapped, not decoded again
    image = next(root.rglob("*.png"))
    from PIL import Image

    Image.new("RGB", (12, 12), (255, 255, 255)).save(image)
    changed = load()
    assert len([p for p in entry.parent.iterdir() if p.is_dir()]) == 2
    assert changed[0] != first[0]


def test_gpu_memory_budget_counts_every_slot_sharing_the_gpu() -> None:
    gib = 2**30
    # Alone on an empty 80 GiB GPU: half of it. Four slots starting together see the same
    # 80 GiB free: each may take half of its quarter, not half of everything.
    assert device_memory_budget(80 * gib, 80 * gib, 0.5, slots=1) == 40 * gib
    assert device_memory_budget(80 * gib, 80 * gib, 0.5, slots=4) == 10 * gib
    # Little free memory left: the free memory bounds it.
    assert device_memory_budget(8 * gib, 80 * gib, 0.5, slots=4) == 4 * gib


def test_each_gpu_slot_worker_is_told_how_many_slots_share_its_gpu() -> None:
    slots = plan_slots([0, 1], 3)
    envs = [child_env(slot, slots, "sqlite:///x.db") for slot in slots]
    assert [e[SLOTS_ENV] for e in envs] == ["3"] * 6
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "0", "0", "1", "1", "1"]
    (cpu,) = plan_slots([], 1)
    assert child_env(cpu, [cpu], "sqlite:///x.db")[SLOTS_ENV] == "1"
    assert isinstance(cpu, Slot)


def test_a_stopping_worker_frees_the_copies_no_process_maps_and_keeps_the_rest(
    tmp_path: Path, sqlite_url: str
) -> None:
    """tmpfs is memory: entries left when ``hpo worker`` stops are removed, unless another process
    (here: this test, as another worker's trainer would) still maps them."""
    from synthetic_data import make_imagefolder

    root = make_imagefolder(tmp_path / "data", classes=3, per_class=6, size=(12, 12), ext="png")
    folder = tmp_path / "shared"
    env = cli_env({"HPO_SHARED_DATA": str(folder)})
    shared = folder / f"hpo-data-{os.getuid()}"
    _, _, held = load_shared(shared, "held by another worker", lambda: ({"x": torch.zeros(3)}, {}))
    _, _, orphan = load_shared(shared, "left by a killed worker", lambda: ({"x": torch.ones(3)}, {}))
    assert held is not None and orphan is not None
    orphan.close()
    study = tmp_path / "mlp.yaml"
    study.write_text(
        f"""name: mlp
objective: image_classifier
data: {{format: imagefolder, root: {root}, image_size: 8, val_fraction: 0.25}}
settings: {{model: mlp, optimizer: sgd, batch_size: 6}}
search_space:
  lr: {{type: float, low: 0.01, high: 0.1, log: true}}
metric: val_loss
direction: minimize
n_trials: 1
budget: {{max_epochs: 1}}
sampler: {{name: random, seed: 0}}
"""
    )
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "hpo"),
            "worker",
            str(study),
            "--storage",
            sqlite_url,
            "--no-progress",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETE" in result.stdout
    assert held.entry.is_dir()  # mapped by a live process
    assert not orphan.entry.exists()
    assert [p for p in shared.iterdir() if p.is_dir()] == [held.entry]  # the worker's own copy freed too
    held.close()


def test_attribute_inputs_are_fingerprinted_by_their_labels_not_the_image_files(tmp_path: Path) -> None:
    """``inputs: attributes`` reads no image, so the shared copy's key does not stat them (CelebA:
    202,599 files, 1-2 s per trainer start): an image rewritten leaves the key as it was, an
    attribute edited changes it; with image inputs the image changes it."""
    from synthetic_data import make_celeba

    from objectives.vision import data as vision_data

    root = make_celeba(tmp_path / "celeba", n=12, size=8)

    def fingerprint(inputs: str) -> str | None:
        config = vision_data.DataConfig(format="celeba", root=str(root), inputs=inputs)
        catalog = vision_data.read_catalog(config, root, "test")
        return vision_data._fingerprint(catalog, images=inputs == "images")

    before = {inputs: fingerprint(inputs) for inputs in ("attributes", "images")}
    image = root / "img_align_celeba" / "000001.jpg"
    image.write_bytes(image.read_bytes() + b"\0")
    after_image = {inputs: fingerprint(inputs) for inputs in ("attributes", "images")}
    assert after_image["attributes"] == before["attributes"] is not None
    assert after_image["images"] != before["images"]
    attributes = root / "list_attr_celeba.txt"
    lines = attributes.read_text().splitlines()
    lines[2] = lines[2][:-2] + ("-1" if lines[2].endswith(" 1") else " 1")
    attributes.write_text("\n".join(lines) + "\n")
    assert fingerprint("attributes") != before["attributes"]
