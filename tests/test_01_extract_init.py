"""01_extract_init.py: data conventions, networks, and the raw-feature rows (the contrastive prior)."""
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import demo_data
from helpers import demo_folder, run_distributed, stage, stage_argv



extract = stage("01_extract_init")
torch.set_num_threads(1)

SIZE, BATCH = 16, 8  # 4 classes x 8 images at 16 px: 32 instances


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_folder(tmp_path_factory, 4, 8, 2, SIZE)


def argv_01(data, out, *extra):
    return stage_argv(data, out, SIZE, BATCH, "--diagnostic-samples", "16", *extra)


def run_01(data, out, *extra):
    extract.main(argv_01(data, out, *extra))
    return torch.load(os.path.join(out, "init.pt"), weights_only=True)


def reference_rows(network_state, paths, batches, bn_train):
    """Unit embeddings in float64 of `paths` (in id order), each batch of ids embedded together."""
    net = extract.EmbeddingNet("resnet18", SIZE).double()
    net.load_state_dict(network_state)
    net.train(bn_train)
    dataset = extract.ImageList(paths, extract.eval_transform(SIZE))
    rows = torch.empty(len(paths), 128, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            batch = [int(i) for i in batch]
            images = torch.stack([dataset[i][0] for i in batch])
            rows[batch] = F.normalize(net(images.double()), dim=1)
    return rows


def colour_classes(root, classes=4, per_class=8):
    """ImageFolder data whose classes differ only by their mean colour (plus per-image noise): what
    BN in training mode removes from a batch that holds one class."""
    colours = torch.tensor([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40]], dtype=torch.float)
    generator = torch.Generator().manual_seed(0)
    for c in range(classes):
        os.makedirs(os.path.join(root, "train", f"c{c}"))
        for i in range(per_class):
            pixels = colours[c][:, None, None] + 5 * torch.randn(3, SIZE, SIZE, generator=generator)
            image = pixels.clamp(0, 255).byte().permute(1, 2, 0).numpy()
            Image.fromarray(image).save(os.path.join(root, "train", f"c{c}", f"{i}.png"))
    return root


# ---------------------------------------------------------------- errors and data conventions

def test_fail_prints_one_error_line_and_exits_with_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        extract.fail("something is wrong; do this instead")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: something is wrong; do this instead\n"


@pytest.mark.parametrize("device, gpus, local_rank", [("auto", 1, 1), ("cuda", 2, 3), ("cuda", 0, 0)])
def test_a_process_without_a_gpu_of_its_own_is_refused_with_one_line(data, tmp_path, capsys, monkeypatch, device,
                                                                     gpus, local_rank):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    with pytest.raises(SystemExit) as exit_info:
        extract.main(argv_01(data, str(tmp_path / "run"), "--device", device))
    assert exit_info.value.code == 2
    assert f"process {local_rank} of this node has no GPU of its own ({gpus} visible)" in capsys.readouterr().err


def test_list_images_is_recursive_sorted_and_labels_by_top_folder(tmp_path):
    for rel in ("b/x/2.png", "b/1.jpg", "a/z.JPEG", "a/notes.txt"):
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    paths, labels, classes = extract.list_images(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["a/z.JPEG", "b/1.jpg", "b/x/2.png"]
    assert labels == [0, 1, 1] and classes == ["a", "b"]


@pytest.mark.parametrize("make", [False, True])
def test_list_images_refuses_a_missing_or_imageless_folder(tmp_path, capsys, make):
    folder = tmp_path / "train"
    if make:
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
    with pytest.raises(SystemExit):
        extract.list_images(str(folder))
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(folder) in err and err.count("\n") == 1


def test_changed_data_is_refused(tmp_path, capsys):
    run = str(tmp_path / "run")
    root = str(tmp_path)
    first = [os.path.join(root, "train", "a", f"{i}.png") for i in range(5)]
    os.makedirs(os.path.dirname(first[0]))
    for path in first:
        open(path, "w").close()
    extract.check_data(run, first, root)
    extract.check_data(run, list(first), root)  # the same list again: accepted
    with pytest.raises(SystemExit):
        extract.check_data(run, first[:4], root)
    err = capsys.readouterr().err
    assert "5 training images" in err and "4 different" in err and err.count("\n") == 1


def test_a_truncated_image_stops_the_pass_with_a_line_naming_it(tmp_path, capsys):
    root = demo_data.make_demo_dataset(str(tmp_path / "d"), num_classes=2, train_per_class=2, val_per_class=0, image_size=SIZE)
    bad = os.path.join(root, "train", "001_ring", "00001.png")
    with open(bad, "r+b") as f:
        f.truncate(60)
    with pytest.raises(extract.InputError, match="00001.png"):
        extract.ImageList([bad], extract.eval_transform(SIZE))[0]
    with pytest.raises(SystemExit) as exit_info:
        run_01(root, str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and bad in err and err.count("\n") == 1


def test_batch_size_must_split_evenly_over_processes(capsys):
    assert extract.resolve_rank_batch(12, 3) == 4
    with pytest.raises(SystemExit):
        extract.resolve_rank_batch(10, 3)
    assert "multiple of 3" in capsys.readouterr().err


# ---------------------------------------------------------------- networks and transforms

def test_backbone_state_dict_loads_into_torchvision_resnet_with_only_fc_missing():
    backbone, width = extract.build_backbone("resnet18", 96)
    result = torchvision.models.resnet18().load_state_dict(backbone.state_dict(), strict=False)
    assert width == 512 and sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_small_images_get_the_3x3_stem_and_load_into_a_resnet_with_that_stem():
    backbone, _ = extract.build_backbone("resnet18", 32)
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, torch.nn.Identity)
    target = torchvision.models.resnet18()
    target.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    result = target.load_state_dict(backbone.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_embedding_net_maps_a_batch_to_dim_through_a_two_layer_mlp():
    net = extract.EmbeddingNet("resnet18", SIZE, dim=128)
    linears = [m for m in net.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 128)]
    assert net(torch.randn(3, 3, SIZE, SIZE)).shape == (3, 128)


def test_transforms_give_the_requested_size_and_train_views_differ():
    image = torchvision.transforms.functional.to_pil_image(torch.rand(3, 40, 50))
    assert extract.eval_transform(SIZE)(image).shape == (3, SIZE, SIZE)
    assert extract.eval_transform(224).transforms[0].size == 256  # the usual 256 -> 224 centre crop
    views = extract.TwoViews(extract.train_transform(SIZE))(image)
    assert views.shape == (2, 3, SIZE, SIZE) and not torch.equal(views[0], views[1])


# ---------------------------------------------------------------- the pass

def test_running_bn_rows_are_the_frozen_network_embeddings_of_shuffled_batches(data, tmp_path, capsys):
    init = run_01(data, str(tmp_path / "run"))
    paths, labels, _ = extract.list_images(os.path.join(data, "train"))
    rows = init["classifier"]["weight"]
    assert rows.shape == (len(paths), 128) and init["classifier"]["num_classes"] == len(paths)
    assert init["classifier"]["momentum"] is None
    # Training-mode BN normalises each batch with its own statistics: same batches, same rows.
    batches = extract.prior_batches(len(paths), BATCH, seed=0)
    expected = reference_rows(init["network"], paths, batches, bn_train=True)
    torch.testing.assert_close(rows.double(), expected, atol=1e-5, rtol=1e-4)
    # The pass moved the BN running statistics (and nothing else).
    assert init["network"]["backbone.bn1.running_mean"].abs().sum() > 0
    out = capsys.readouterr().out
    assert "same-class top-1 retrieval" in out and "(chance 22.6%)" in out and "gap" in out


def test_prior_batches_are_a_seeded_permutation_without_a_batch_of_one():
    for n in range(2, 30):
        for batch in range(2, 9):
            batches = extract.prior_batches(n, batch, seed=5)
            assert sorted(torch.cat(batches).tolist()) == list(range(n))
            assert all(2 <= len(b) <= batch + 1 for b in batches)
    again = extract.prior_batches(29, 6, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(again, extract.prior_batches(29, 6, seed=5)))
    assert not torch.equal(torch.cat(again), torch.arange(29))  # shuffled, not in file order


@pytest.mark.parametrize("images, batch", [(7, 6), (19, 6), (13, 4), (12, 4)])
def test_every_row_is_computed_the_same_way_twice_whatever_the_remainder(tmp_path, images, batch):
    """7 / 6 and 19 / 6 leave a last batch of one: it joins the batch before, and no row is skipped."""
    root = str(tmp_path / "data")
    for i in range(images):
        os.makedirs(os.path.join(root, "train", "a"), exist_ok=True)
        pixels = torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(i))
        Image.fromarray((255 * pixels).byte().numpy()).save(os.path.join(root, "train", "a", f"{i:02d}.png"))
    argv = ["--batch-size", str(batch)]
    first = run_01(root, str(tmp_path / "one"), *argv)
    second = run_01(root, str(tmp_path / "two"), *argv)
    assert torch.equal(first["classifier"]["weight"], second["classifier"]["weight"])
    paths, _, _ = extract.list_images(os.path.join(root, "train"))
    expected = reference_rows(first["network"], paths, extract.prior_batches(images, batch, 0), bn_train=True)
    torch.testing.assert_close(first["classifier"]["weight"].double(), expected, atol=1e-5, rtol=1e-4)


def test_the_prior_keeps_a_class_signal_that_class_sorted_batches_would_remove(tmp_path):
    root = colour_classes(str(tmp_path / "colours"))
    paths, labels, _ = extract.list_images(os.path.join(root, "train"))
    init = run_01(root, str(tmp_path / "run"))
    hits, chance, _ = extract.retrieval_top1(init["classifier"]["weight"], labels, len(paths), 0)
    assert hits > 0.5 > chance
    # The same network on batches of one class each (files in folder order) loses the colour.
    in_file_order = torch.arange(len(paths)).split(BATCH)
    sorted_rows = reference_rows(init["network"], paths, in_file_order, bn_train=True)
    sorted_hits, _, _ = extract.retrieval_top1(sorted_rows.float(), labels, len(paths), 0)
    assert sorted_hits < chance


def test_fixed_bn_rows_equal_eval_mode_embeddings_of_the_untouched_network(data, tmp_path):
    init = run_01(data, str(tmp_path / "run"), "--bn", "fixed", "--seed", "3")
    torch.manual_seed(3)
    fresh = extract.EmbeddingNet("resnet18", SIZE).state_dict()
    assert all(torch.equal(fresh[key], value) for key, value in init["network"].items())
    paths, _, _ = extract.list_images(os.path.join(data, "train"))
    expected = reference_rows(init["network"], paths, [range(len(paths))], bn_train=False)
    torch.testing.assert_close(init["classifier"]["weight"].double(), expected, atol=1e-5, rtol=1e-4)


def test_ema_bn_normalises_each_batch_by_the_running_averages_it_has_just_updated():
    """--bn ema: batch 1 by its own statistics, batch t by 0.9 x the averages before it + 0.1 x its
    own (unbiased variance, as BN's running_var), in eval mode; no BN normalises by the batch alone."""
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    hooks = extract.set_bn_mode(net, "ema")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, generator=g) * (i + 1) + i for i in range(3)]
    mean, var = batches[0].mean(0), batches[0].var(0)
    for i, x in enumerate(batches):
        if i:
            mean, var = 0.9 * mean + 0.1 * x.mean(0), 0.9 * var + 0.1 * x.var(0)
        with torch.no_grad():
            torch.testing.assert_close(net(x), (x - mean) / (var + 1e-5).sqrt(), rtol=1e-5, atol=1e-5)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(net[0].running_mean, mean)
    assert not net.training


def test_ema_bn_arm_writes_rows_and_the_averaged_statistics(data, tmp_path, capsys):
    init = run_01(data, str(tmp_path / "run"), "--bn", "ema")
    rows = init["classifier"]["weight"]
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(rows)))
    assert init["network"]["backbone.bn1.running_mean"].abs().sum() > 0
    assert "BN ema" in capsys.readouterr().out


def test_random_init_writes_unit_gaussian_rows_without_a_pass(data, tmp_path):
    init = run_01(data, str(tmp_path / "run"), "--init", "random")
    rows = init["classifier"]["weight"]
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(rows)))
    assert init["network"]["backbone.bn1.running_mean"].abs().sum() == 0  # no pass, statistics untouched


def _run_01_distributed(rank, world_size, data, out, batch):
    extract.main(argv_01(data, out, "--batch-size", str(batch)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_several_processes_share_the_batches_and_each_row_reaches_its_owner(data, tmp_path, world_size):
    """Each process embeds its share of the shuffled batches (of --batch-size / W) and sends every row
    to the process that owns it; the rows equal those of one process with batches of the same size."""
    out, single = str(tmp_path / "run"), str(tmp_path / "single")
    run_distributed(_run_01_distributed, world_size, data, out, 4 * world_size)
    init = torch.load(os.path.join(out, "init.pt"), weights_only=True)
    one = run_01(data, single, "--batch-size", "4")
    paths, _, _ = extract.list_images(os.path.join(data, "train"))
    expected = reference_rows(init["network"], paths, extract.prior_batches(len(paths), 4, 0), bn_train=True)
    torch.testing.assert_close(init["classifier"]["weight"].double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(init["classifier"]["weight"], one["classifier"]["weight"], atol=1e-5, rtol=1e-4)
    # The saved BN statistics are the average over all batches, whatever the process count.
    for key in ("backbone.bn1.running_mean", "backbone.layer4.1.bn2.running_var"):
        torch.testing.assert_close(init["network"][key], one["network"][key], atol=1e-5, rtol=1e-4)


def test_help_shows_single_process_torchrun_and_multi_node_commands():
    text = extract.arguments().format_help()
    assert "python 01_extract_init.py" in text and "torchrun --nproc_per_node" in text and "--nnodes" in text
