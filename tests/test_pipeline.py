"""grain pipelines: sharding, determinism, resolutions, resumption, eval padding."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import portpicker
import pytest

from evit_jax.data import pipeline, sources, transforms

N = 50


def _source(n=N, size=12):
    # Labels are the example indices, so batches tell exactly which examples they hold.
    return [{"image": np.random.default_rng(i).integers(0, 256, (size, size, 3), np.uint8),
             "label": i} for i in range(n)]


TRAIN = transforms.ClassificationTrainTransform(scale=(0.3, 1.0))
EVAL = transforms.ClassificationEvalTransform(size=8)


def _train(source=None, *, process_index=0, process_count=1, global_batch_size=8,
           image_sizes=(8,), seed=0, **kwargs):
    return pipeline.make_train_iterator(
        _source() if source is None else source, TRAIN, global_batch_size=global_batch_size,
        image_sizes=image_sizes, seed=seed, process_index=process_index,
        process_count=process_count, **kwargs)


def _take(iterator, steps):
    return [next(iterator) for _ in range(steps)]


def _global_stream(process_count, steps, **kwargs):
    """Labels and images in global stream order, rebuilt from every process's batches."""
    per_process = [_take(_train(process_index=p, process_count=process_count, **kwargs), steps)
                   for p in range(process_count)]
    labels, images = [], []
    for step in range(steps):
        # The global batch is the local batches in process order (process p holds block p).
        for p in range(process_count):
            labels.extend(int(label) for label in per_process[p][step]["label"])
            images.extend(per_process[p][step]["image"])
    return np.array(labels), images


def test_batches_have_the_contracted_form():
    batch = next(_train())
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32


def test_shards_are_disjoint_cover_each_epoch_and_reshuffle():
    steps = 13  # 13 * 8 = 104 stream positions: two full epochs of 50 and a bit.
    labels, _ = _global_stream(process_count=2, steps=steps)
    epoch0, epoch1 = labels[:N], labels[N:2 * N]
    assert sorted(epoch0) == list(range(N)) and sorted(epoch1) == list(range(N))
    assert not np.array_equal(epoch0, epoch1)       # A new order every epoch.
    assert not np.array_equal(epoch0, np.arange(N))  # Shuffled at all.


def test_global_batches_do_not_depend_on_process_count():
    one_labels, one_images = _global_stream(process_count=1, steps=6)
    two_labels, two_images = _global_stream(process_count=2, steps=6)
    np.testing.assert_array_equal(one_labels, two_labels)
    for a, b in zip(one_images, two_images):  # Same augmentation for the same example.
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_batches_other_seed_other_batches():
    a, b = _take(_train(seed=3), 3), _take(_train(seed=3), 3)
    c = _take(_train(seed=4), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not all(np.array_equal(x["label"], z["label"]) for x, z in zip(a, c))


def test_resolution_is_per_batch_and_agrees_across_processes():
    sizes = [8, 12, 16, (8, 16)]
    steps = 12
    shapes = [[b["image"].shape[1:3] for b in _take(
        _train(process_index=p, process_count=2, image_sizes=sizes, seed=1), steps)]
        for p in range(2)]
    assert shapes[0] == shapes[1]
    expected = [pipeline.batch_resolution(sizes, 1, step) for step in range(steps)]
    assert shapes[0] == expected
    assert len(set(expected)) > 1


def test_state_restore_gives_the_identical_next_batches():
    kwargs = dict(process_index=1, process_count=2, image_sizes=[8, 12, 16], seed=2)
    iterator = _train(**kwargs)
    _take(iterator, 4)
    state = iterator.get_state()
    expected = _take(iterator, 5)
    resumed = _train(**kwargs)
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 5)):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        _train(global_batch_size=8, process_count=3)
    with pytest.raises(ValueError, match="process_index=2 is outside"):
        _train(process_index=2, process_count=2)
    with pytest.raises(ValueError, match="image_sizes"):
        _train(image_sizes=[])
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.make_eval_iterator(_source(), EVAL, global_batch_size=6, process_index=0,
                                    process_count=4)


@pytest.mark.parametrize("process_count,global_batch_size", [(1, 8), (2, 8), (4, 8)])
def test_eval_sees_every_example_once_with_exact_padding(process_count, global_batch_size):
    n = 37  # Not a multiple of any batch size used.
    source = _source(n)
    local_batch = global_batch_size // process_count
    expected_batches = pipeline.num_eval_batches(n, global_batch_size)
    seen = []
    for p in range(process_count):
        batches = list(pipeline.make_eval_iterator(
            source, EVAL, global_batch_size=global_batch_size, process_index=p,
            process_count=process_count))
        assert len(batches) == expected_batches
        for batch in batches:
            assert batch["image"].shape == (local_batch, 8, 8, 3)
            assert batch["mask"].dtype == np.int32
            real = batch["mask"] == 1
            seen.extend(batch["label"][real].tolist())
            for image, label in zip(batch["image"][~real], batch["label"][~real]):  # padding: example 0, masked
                assert label == 0
                np.testing.assert_array_equal(image, EVAL(source[0])["image"])
            for image, label in zip(batch["image"][real], batch["label"][real]):
                np.testing.assert_array_equal(image, EVAL(source[label])["image"])
    assert sorted(seen) == list(range(n))


def test_eval_batch_plan_groups_by_key_and_pads_each_bucket():
    keys = ["b", "a", "b", "c", "b", "a", "b", "b"]
    plan = pipeline.eval_batch_plan(keys, global_batch_size=2)
    assert [key for key, _, _ in plan] == ["a", "b", "b", "b", "c"]
    real = [int(i) for _, indices, mask in plan for i, m in zip(indices, mask) if m]
    assert sorted(real) == list(range(len(keys)))                      # every example once
    for key, indices, mask in plan:
        assert all(keys[i] == key for i in indices)                     # padding has the bucket's shape too
        assert mask[0] and list(mask) == sorted(mask, reverse=True)    # real first, padding last
    assert [list(m) for _, _, m in plan] == [[1, 1], [1, 1], [1, 1], [1, 0], [1, 0]]
    with pytest.raises(ValueError, match="empty"):
        pipeline.eval_batch_plan([], 2)


@pytest.mark.parametrize("process_count", [1, 2])
def test_bucketed_eval_batches_agree_across_processes(process_count):
    """Images of 3 sizes: every global batch holds one size, the processes' local batches have
    that size at the same index, and together they hold every example once."""
    sizes = [8, 12, 8, 16, 12, 8, 8, 12, 16]
    source = [{"image": np.full((s, s, 3), i, np.uint8), "label": i} for i, s in enumerate(sizes)]

    def transform(example, key):
        assert example["image"].shape[0] == key
        return {"image": example["image"], "label": np.int32(example["label"])}

    per_process = [list(pipeline.make_bucketed_eval_iterator(
        source, transform, sizes, global_batch_size=4, process_index=p, process_count=process_count))
        for p in range(process_count)]
    assert len({len(batches) for batches in per_process}) == 1
    seen = []
    for step in range(len(per_process[0])):
        local = [batches[step] for batches in per_process]
        assert len({b["image"].shape for b in local}) == 1 and local[0]["image"].shape[0] == 4 // process_count
        for b in local:
            seen.extend(b["label"][b["mask"] == 1].tolist())
    assert sorted(seen) == list(range(len(sizes)))
    with pytest.raises(ValueError, match="bucket keys"):
        pipeline.make_bucketed_eval_iterator(source, transform, sizes[:-1], global_batch_size=4,
                                             process_index=0, process_count=1)


def test_worker_processes_give_the_same_batches(tmp_path):
    """The full official train transform (RandomResizedCrop, flip, RandAugment, erasing box)
    gives the same batches in-process and in 2 grain workers (per-example Generators)."""
    source = sources.get_source("evit_shapes/tiny", "train", str(tmp_path))
    full = transforms.ClassificationTrainTransform(randaugment=(2, 9), erasing_prob=0.5)
    kwargs = dict(global_batch_size=8, image_sizes=[16, 24], seed=0, process_index=0,
                  process_count=1)
    expected = _take(pipeline.make_train_iterator(source, full, **kwargs), 4)
    iterator = pipeline.make_train_iterator(source, full, worker_count=2, **kwargs)
    try:
        got = _take(iterator, 4)
    finally:
        iterator.close()
    assert sorted(expected[0]) == ["erase_box", "image", "label"]
    for want, have in zip(expected, got):
        for key in want:
            np.testing.assert_array_equal(want[key], have[key])


_GLOBAL_EVAL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from evit_jax.data import pipeline, transforms
    from evit_jax.train import mesh as mesh_lib

    port, process_id, process_count = map(int, sys.argv[1:4])
    if process_count > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=process_count,
                                   process_id=process_id)
    mesh = mesh_lib.create_mesh("replicated")
    source = [{"image": np.full((8, 8, 3), i, np.uint8), "label": i} for i in range(37)]
    iterator = pipeline.make_eval_iterator(
        source, transforms.ClassificationEvalTransform(size=8), global_batch_size=8,
        process_index=jax.process_index(), process_count=jax.process_count())

    @jax.jit
    def stats(batch):
        mask = batch["mask"]
        pixel = batch["image"][:, 0, 0, 0].astype(np.int32)
        return mask.sum(), (batch["label"] * mask).sum(), (pixel == batch["label"]).all()

    count = label_sum = 0
    for local in iterator:
        batch = mesh_lib.global_batch_from_local(local, mesh)
        assert batch["image"].shape == (8, 8, 8, 3), batch["image"].shape
        c, s, consistent = stats(batch)
        assert bool(consistent)
        count, label_sum = count + int(c), label_sum + int(s)
    print("RESULT", count, label_sum, len(jax.devices()))
""")


@pytest.mark.parametrize("process_count", [1, 2])
def test_global_eval_batches_across_devices_and_processes(process_count):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(
        [sys.executable, "-c", _GLOBAL_EVAL_SCRIPT, str(port), str(p), str(process_count)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for p in range(process_count)]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        result = [line for line in out.splitlines() if line.startswith("RESULT")][-1]
        assert result.split()[1:] == ["37", str(sum(range(37))), str(2 * process_count)]


def test_benchmark_command_runs(tmp_path, capsys):
    from evit_jax.tools import pipeline_bench

    pipeline_bench.main(["--dataset", "evit_shapes/tiny", "--data_dir", str(tmp_path),
                    "--image_sizes", "16,24", "--workers", "0", "--batch_size", "8",
                    "--num_batches", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "images/s" in line]
    assert len(lines) == 2 and "@24px" in lines[1] and "CPU-ms/image" in lines[0]
    with pytest.raises(SystemExit):
        pipeline_bench.main([])  # --data_dir is required.


def test_benchmark_recipe_on_a_jpeg_folder_against_timm(tmp_path, capsys):
    """The --jpeg_folder path: generates ImageNet-like JPEGs, prepares them with image_folder,
    runs the official recipe through grain and timm's DataLoader on the same files, breakdown too."""
    pytest.importorskip("timm")
    from evit_jax.tools import pipeline_bench

    argv = ["--jpeg_folder", str(tmp_path / "jpegs"), "--num_images", "20", "--data_dir", str(tmp_path / "data"),
            "--workers", "0", "--batch_size", "8", "--num_batches", "2", "--repeats", "1", "--image_size", "64",
            "--compare-timm", "--breakdown", "--recipe", "randaug=2,5", "--recipe", "erasing=0.2"]
    pipeline_bench.main(argv)
    out = capsys.readouterr().out
    assert "wrote 40 JPEGs" in out and "RandAugment (2, 5.0), erasing 0.2" in out
    assert "evit_jax RandAugment" in out and "timm     RandAugment" in out
    medians = [line for line in out.splitlines() if line.startswith("median")]
    assert len(medians) == 2 and "evit_jax" in medians[0] and "timm" in medians[1]
    pipeline_bench.main(argv[:-5])   # Second run: the folder and the dataset are reused.
    assert "wrote" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pipeline_bench.main(argv[:6] + ["--recipe", "mixup=1"])
