"""01_extract_init.py: data conventions, networks, and the raw-feature rows (the contrastive prior)."""
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from helpers import run_distributed, stage

import dist_softmax

extract = stage("01_extract_init")
torch.set_num_threads(1)

SIZE, BATCH = 16, 8  # 4 classes x 8 images at 16 px: 32 instances


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    return extract.make_demo_dataset(root, num_classes=4, train_per_class=8, val_per_class=2, image_size=SIZE)


def argv_01(data, out, *extra):
    return ["--data", data, "--out", out, "--arch", "resnet18", "--image-size", str(SIZE),
            "--batch-size", str(BATCH), "--workers", "0", "--diagnostic-samples", "16", *extra]


def run_01(data, out, *extra):
    extract.main(argv_01(data, out, *extra))
    return torch.load(os.path.join(out, "init.pt"), weights_only=True)


def reference_rows(network_state, paths, batch, bn_train):
    """Unit embeddings in float64 of `paths`, embedded in consecutive batches of `batch`."""
    net = extract.EmbeddingNet("resnet18", SIZE).double()
    net.load_state_dict(network_state)
    net.train(bn_train)
    dataset = extract.ImageList(paths, extract.eval_transform(SIZE))
    rows = []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            images = torch.stack([dataset[j][0] for j in range(i, min(i + batch, len(paths)))])
            rows.append(F.normalize(net(images.double()), dim=1))
    return torch.cat(rows)


# ---------------------------------------------------------------- errors and data conventions

def test_fail_prints_one_error_line_and_exits_with_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        extract.fail("something is wrong; do this instead")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: something is wrong; do this instead\n"


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
    extract.check_data_fingerprint(run, first, root)
    extract.check_data_fingerprint(run, list(first), root)  # the same list again: accepted
    with pytest.raises(SystemExit):
        extract.check_data_fingerprint(run, first[:4], root)
    err = capsys.readouterr().err
    assert "5 training images" in err and "4 different" in err and err.count("\n") == 1


def test_demo_dataset_is_deterministic_imagefolder_with_one_folder_per_shape(tmp_path):
    a = extract.make_demo_dataset(str(tmp_path / "a"), num_classes=3, train_per_class=2, val_per_class=1, image_size=SIZE)
    b = extract.make_demo_dataset(str(tmp_path / "b"), num_classes=3, train_per_class=2, val_per_class=1, image_size=SIZE)
    paths, labels, classes = extract.list_images(os.path.join(a, "train"))
    assert classes == ["000_circle", "001_ring", "002_square"] and labels == [0, 0, 1, 1, 2, 2]
    assert len(extract.list_images(os.path.join(a, "val"))[0]) == 3
    for p in paths:
        assert open(p, "rb").read() == open(p.replace(a, b, 1), "rb").read()
    with Image.open(paths[0]) as image:
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"


def test_a_truncated_image_stops_the_pass_with_a_line_naming_it(tmp_path, capsys):
    root = extract.make_demo_dataset(str(tmp_path / "d"), num_classes=2, train_per_class=2, val_per_class=0, image_size=SIZE)
    bad = os.path.join(root, "train", "001_ring", "00001.png")
    with open(bad, "r+b") as f:
        f.truncate(60)
    with pytest.raises(extract.BadImageError, match="00001.png"):
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
    views = extract.TwoViews(extract.train_transform(SIZE))(image)
    assert views.shape == (2, 3, SIZE, SIZE) and not torch.equal(views[0], views[1])


# ---------------------------------------------------------------- the pass

def test_running_bn_rows_equal_the_frozen_network_embeddings(data, tmp_path, capsys):
    init = run_01(data, str(tmp_path / "run"))
    paths, labels, _ = extract.list_images(os.path.join(data, "train"))
    rows = init["classifier"]["weight"]
    assert rows.shape == (len(paths), 128) and init["classifier"]["num_classes"] == len(paths)
    assert init["classifier"]["momentum"] is None
    # Training-mode BN normalises each batch with its own statistics: same batches, same rows.
    expected = reference_rows(init["network"], paths, BATCH, bn_train=True)
    torch.testing.assert_close(rows.double(), expected, atol=1e-5, rtol=1e-4)
    # The pass moved the BN running statistics (and nothing else).
    assert init["network"]["backbone.bn1.running_mean"].abs().sum() > 0
    out = capsys.readouterr().out
    assert "same-class top-1 retrieval" in out and "(chance 22.6%)" in out and "gap" in out


def test_fixed_bn_rows_equal_eval_mode_embeddings_of_the_untouched_network(data, tmp_path):
    init = run_01(data, str(tmp_path / "run"), "--bn", "fixed", "--seed", "3")
    torch.manual_seed(3)
    fresh = extract.EmbeddingNet("resnet18", SIZE).state_dict()
    assert all(torch.equal(fresh[key], value) for key, value in init["network"].items())
    paths, _, _ = extract.list_images(os.path.join(data, "train"))
    expected = reference_rows(init["network"], paths, len(paths), bn_train=False)
    torch.testing.assert_close(init["classifier"]["weight"].double(), expected, atol=1e-5, rtol=1e-4)


def test_random_init_writes_unit_gaussian_rows_without_a_pass(data, tmp_path):
    init = run_01(data, str(tmp_path / "run"), "--init", "random")
    rows = init["classifier"]["weight"]
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(rows)))
    assert init["network"]["backbone.bn1.running_mean"].abs().sum() == 0  # no pass, statistics untouched


def _run_01_distributed(rank, world_size, data, out):
    extract.main(argv_01(data, out))


def test_two_processes_each_embed_exactly_their_own_rows(data, tmp_path):
    out = str(tmp_path / "run")
    run_distributed(_run_01_distributed, 2, data, out)
    init = torch.load(os.path.join(out, "init.pt"), weights_only=True)
    paths, _, _ = extract.list_images(os.path.join(data, "train"))
    rows = init["classifier"]["weight"]
    for rank in range(2):
        start, end = dist_softmax.shard_range(len(paths), rank, 2)
        # each rank embeds its rows in batches of BATCH / 2 with its own BN statistics
        expected = reference_rows(init["network"], paths[start:end], BATCH // 2, bn_train=True)
        torch.testing.assert_close(rows[start:end].double(), expected, atol=1e-5, rtol=1e-4)


def test_help_shows_single_process_torchrun_and_multi_node_commands():
    text = extract.parser.format_help()
    assert "python 01_extract_init.py" in text and "torchrun --nproc_per_node" in text and "--nnodes" in text
