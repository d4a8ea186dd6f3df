"""Manifest validation: what one project costs the project sensor's tick, at the caps.

Builds, in a temporary folder, a small manifest (4 scenes) and one at both caps
(`manifests.max_scenes` scenes, padded to just under `manifests.max_bytes`), then
measures, interleaved, median of N runs:

  validate       load_manifest, cold (read with the cap, YAML, caps, schema, files, hash)
  revalidate     load_manifest of unchanged bytes, as every later sensor tick does (the
                 parsed spec is reused; files are still checked and the hash recomputed)
  yaml floor     yaml.load of the same bytes with the loader validation uses (the floor)
  reject         load_manifest of a file 50x over the byte cap (refused from its size)
  sensor tick    project_sensor over the capped project and the small one, once the
                 projects are registered (what every 30 s tick costs while nothing changes)

and prints one RATIO line per target:

  manifest_validate_max_vs_small   validate time grows at most linearly with the file
                                   (target: at most the byte ratio of the two files)
  manifest_validate_vs_yaml_max    validation over parsing alone, at the cap
  manifest_revalidate_vs_cold_max  a later tick's cost over the first one's, at the cap
  manifest_reject_oversize_vs_small  refusing an oversized file costs no more than a
                                   small valid one (nothing is parsed)
  sensor_tick_unchanged_vs_validate_max  a tick with nothing changed over one cold validation

Run from the repo root: python benchmarks/manifest_validation.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cv_assets.manifest import _YAML_LOADER, ManifestError, clear_cache, load_manifest  # noqa: E402
from cv_assets.settings import ManifestSettings  # noqa: E402

CODES = [f"CHAR_{i:02d}" for i in range(1, 9)]


def write_project(folder: Path, n_scenes: int, pad_to: int | None = None) -> Path:
    """A project folder whose manifest has `n_scenes` scenes; with `pad_to`, each scene's
    clip name is lengthened so the file ends just under `pad_to` bytes."""
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for code in CODES:
        (folder / "refs" / f"{code}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    header = f"project: {folder.name}\nname: Benchmark\nassets:\n" + "".join(
        f"  - {{code: {c}, kind: character, name: {c.lower()}, reference_image: refs/{c}.png}}\n" for c in CODES
    ) + "scenes:\n"

    def scene(i: int, pad: int) -> str:
        return (f"  - {{index: {i}, clip: clips/scene_{i:05d}{'x' * pad}.mp4, "
                f"expected_assets: [{', '.join(CODES[:4])}]}}\n")

    pad = 0
    if pad_to:
        base = len(header) + sum(len(scene(i, 0)) for i in range(n_scenes))
        pad = max(0, (pad_to - 64 - base) // n_scenes)
    text = header + "".join(scene(i, pad) for i in range(n_scenes))
    (folder / "project.yaml").write_text(text)
    return folder


def time_once(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def reject(folder: Path, limits) -> None:
    try:
        load_manifest(folder, limits)
    except ManifestError as exc:
        assert "above the limit manifests.max_bytes" in str(exc), exc
    else:
        raise AssertionError("the oversized manifest was accepted")


def sensor_tick_seconds(root: Path, runs: int) -> list[float]:
    """Median-ready timings of project_sensor ticks over `root/projects` after the first tick
    (which registers the projects), with an ephemeral instance and a temporary database."""
    import yaml as _yaml
    from dagster import DagsterInstance, build_sensor_context

    from cv_assets.defs.projects import project_sensor
    from cv_assets.defs.resources import SettingsResource, build_resources
    from cv_assets.settings import load_settings

    config = root / "config.yaml"
    config.write_text(_yaml.safe_dump({"storage": {
        "database_url": f"sqlite:///{root / 'app.sqlite'}", "duckdb_path": str(root / "warehouse.duckdb"),
        "projects_root": str(root / "projects")}}))
    settings = load_settings(config, env={})
    resources = {"settings": SettingsResource.from_settings(settings), "app_db": build_resources(settings)["app_db"]}
    instance = DagsterInstance.ephemeral()

    def tick():
        with build_sensor_context(instance=instance, resources=resources) as context:
            assert len(project_sensor(context).run_requests) == 2

    tick()
    return [time_once(tick) for _ in range(runs)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    parser.add_argument("--runs", type=int, help="runs per measurement, median reported (default 7, 3 with --quick)")
    args = parser.parse_args()
    runs = max(3, args.runs or (3 if args.quick else 7))
    limits = ManifestSettings()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = write_project(root / "projects" / "small", 4)
        large = write_project(root / "projects" / "large", limits.max_scenes, pad_to=limits.max_bytes)
        oversize = root / "oversize"
        oversize.mkdir()
        with open(oversize / "project.yaml", "wb") as handle:
            handle.truncate(50 * limits.max_bytes)  # 50 MiB, sparse: the 50 MB manifest

        small_bytes = (small / "project.yaml").stat().st_size
        large_bytes = (large / "project.yaml").stat().st_size
        assert large_bytes <= limits.max_bytes and len(load_manifest(large, limits).spec.scenes) == limits.max_scenes
        large_text = (large / "project.yaml").read_bytes()

        samples: dict[str, list[float]] = {k: [] for k in ("small", "large", "warm", "yaml_large", "reject")}
        for _ in range(runs):  # interleaved, so load on the machine hits every measurement alike
            clear_cache()  # outside the timing: freeing the previous large spec is not this run's cost
            gc.collect()
            samples["small"].append(time_once(lambda: load_manifest(small, limits)))
            clear_cache()
            gc.collect()
            samples["large"].append(time_once(lambda: load_manifest(large, limits)))
            samples["warm"].append(time_once(lambda: load_manifest(large, limits)))
            samples["yaml_large"].append(time_once(lambda: yaml.load(large_text, Loader=_YAML_LOADER)))
            samples["reject"].append(time_once(lambda: reject(oversize, limits)))
        samples["tick"] = sensor_tick_seconds(root, runs)
        m = {k: statistics.median(v) for k, v in samples.items()}

    print(f"small manifest: {small_bytes} bytes, 4 scenes            validate {m['small'] * 1000:8.2f} ms")
    print(f"at the caps:    {large_bytes} bytes, {limits.max_scenes} scenes   validate {m['large'] * 1000:8.2f} ms"
          f"   yaml floor {m['yaml_large'] * 1000:8.2f} ms   revalidate {m['warm'] * 1000:8.2f} ms")
    print(f"50x over the byte cap: refused in {m['reject'] * 1000:.3f} ms (nothing parsed)")
    print(f"sensor tick over both, nothing changed: {m['tick'] * 1000:.1f} ms")
    print(f"(median of {runs} runs; loader {_YAML_LOADER.__name__})")
    byte_ratio = large_bytes / small_bytes
    print(f"RATIO manifest_validate_max_vs_small {m['large'] / m['small']:.1f} target <= {byte_ratio:.0f}")
    print(f"RATIO manifest_validate_vs_yaml_max {m['large'] / m['yaml_large']:.2f} target <= 2")
    print(f"RATIO manifest_revalidate_vs_cold_max {m['warm'] / m['large']:.2f} target <= 0.5")
    print(f"RATIO manifest_reject_oversize_vs_small {m['reject'] / m['small']:.2f} target <= 1")
    print(f"RATIO sensor_tick_unchanged_vs_validate_max {m['tick'] / m['large']:.2f} target <= 0.25")
    return 0


if __name__ == "__main__":
    sys.exit(main())
