"""Beyond classification: a sub-module as the quantized part (``model.quantize_part``), mean IoU, the composed
canvases, VOC folders; torchvision's segmentation networks and a detector's backbone at toy size."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import yaml

import mrecg
from conftest import ROOT, cli
from mrecg.canvases import CLASSES, INK, compose
from mrecg.config import DataConfig
from mrecg.data import dataset, digits
from mrecg.errors import UserError
from mrecg.metrics import confusion, evaluate_miou, iou_scores
from mrecg.parts import capture_inputs, check_traceable, find_part
from mrecg.zoo.segmentation import fcn_resnet_small

TOY = {'data': {'batch_size': 16, 'num_workers': 0}, 'quantize': {'cali_size': 16, 'w_qconfig': {'bit': 4}, 'a_qconfig': {'bit': 4},
                                                'reconstruction': {'iterations': 4, 'batch_size': 8}},
       'mrecg': {'metric': 'none'}, 'process': {'device': 'cpu', 'seed': 3}}


def digit_items(n=200):
    """scikit-learn's digits as 28 x 28 'items' in [0, 1] (real data, no Fashion-MNIST files needed)."""
    d = digits('train', 0)
    x = d.images[:n, 0]
    x = (x - x.min()) / (x.max() - x.min())
    return F.interpolate(x[:, None], size=(28, 28), mode='bilinear', align_corners=False)[:, 0], d.labels[:n]


def canvases(count=24, size=48, channels=1, seed=0):
    items, labels = digit_items()
    return compose(items, labels, count, size, seed=seed, channels=channels)


# ---- the composed canvases --------------------------------------------------------------------------------
def test_canvases_are_seeded_and_their_masks_and_boxes_are_exact():
    a, b, c = canvases(seed=1), canvases(seed=1), canvases(seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)
    raw = a.images[:, 0] * 0.30 + 0.15  # undo the normalisation
    assert torch.all((a.masks > 0) == (raw > INK + 1e-6))  # an item pixel is labelled, the background is not
    assert a.masks.max() < CLASSES
    for mask, boxes, labels in zip(a.masks, a.boxes, a.labels):
        assert 1 <= len(boxes) <= 5 and len(boxes) == len(labels)
        for (x0, y0, x1, y1), label in zip(boxes.long().tolist(), labels.tolist()):
            inside = mask[y0:y1, x0:x1] == label
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # tight box


def test_fashion_segmentation_refuses_unknown_kwargs():
    with pytest.raises(UserError, match="not 'classes'"):
        dataset(DataConfig(type='fashion_segmentation', kwargs={'classes': 3}), 'train')


# ---- mean IoU -----------------------------------------------------------------------------------------------
def test_iou_of_a_known_confusion_and_the_ignore_index():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    conf = confusion(pred, target, 3, 255)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    s = iou_scores(conf)
    assert s['miou'] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s['pixel_accuracy'] == pytest.approx(100 * 4 / 6)
    with pytest.raises(UserError, match='holds class 7'):
        confusion(pred, torch.full_like(target, 7), 3, 255)


def test_miou_of_a_perfect_and_a_constant_predictor():
    c = canvases()

    class Oracle(nn.Module):
        def forward(self, x):  # the label map itself, as one-hot scores (looked up by the batch's position)
            return {'out': F.one_hot(self.masks, CLASSES).permute(0, 3, 1, 2).float()}
    oracle = Oracle()
    oracle.masks = c.masks
    assert evaluate_miou(oracle, [(c.images, c.masks)], torch.device('cpu'), progress=False).score == 100.0
    background = nn.Conv2d(1, CLASSES, 1)
    nn.init.zeros_(background.weight)
    with torch.no_grad():
        background.bias.copy_(torch.arange(CLASSES, 0, -1).float())  # always class 0
    acc = evaluate_miou(background, [(c.images, c.masks)], torch.device('cpu'), progress=False)
    present = len(c.masks.unique())
    assert acc.metric == 'miou' and acc.score == pytest.approx(100 * ((c.masks == 0).float().mean().item()) / present)


# ---- the quantized part -------------------------------------------------------------------------------------
def test_quantize_part_reconstructs_the_backbone_and_leaves_the_head_float():
    torch.manual_seed(0)
    model = fcn_resnet_small().eval()
    c = canvases()
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    cfg = {**TOY, 'model': {'quantize_part': 'backbone'}, 'eval': {'metric': 'miou'}}
    r = mrecg.quantize(model, c.images, cfg, eval_data=(c.images, c.masks))
    assert r.part == 'backbone' and isinstance(r.model.backbone, torch.fx.GraphModule)
    assert r.unit_names == ['stem', 'layer1.0', 'layer1.1', 'layer2.0', 'layer2.1', 'layer3.0', 'layer3.1']
    assert all(torch.equal(v, head[k]) for k, v in r.model.classifier.state_dict().items())
    assert isinstance(model.backbone, nn.Module) and not isinstance(model.backbone, torch.fx.GraphModule)
    assert r.accuracy.metric == 'miou' and 0 <= r.accuracy.score <= 100 and 'miou' in str(r)
    assert r.fp_accuracy.score == pytest.approx(evaluate_miou(model, [(c.images, c.masks)], torch.device('cpu'),
                                                              progress=False).score)
    assert set(r.fp_accuracy.scores) >= {'miou', 'pixel_accuracy'}


def test_the_part_is_calibrated_on_what_it_receives_inside_the_network():
    class Scaled(nn.Module):  # the network's own pre-processing: the part sees 3 * x + 1
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())

        def forward(self, x):
            return self.body(3 * x + 1)
    x = torch.randn(10, 1, 8, 8)
    got = capture_inputs(Scaled(), 'body', x, 4, torch.device('cpu'))
    assert torch.equal(got, 3 * x + 1)


def test_part_errors_are_one_line_and_say_what_to_do():
    model = fcn_resnet_small()
    with pytest.raises(UserError, match="its children are: backbone, classifier"):
        find_part(model, 'encoder')
    with pytest.raises(UserError, match='backbone holds: backbone.conv1'):
        find_part(model, 'backbone.stem')

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.a(x)
    with pytest.raises(UserError, match='never called'):
        capture_inputs(Unused(), 'b', torch.randn(2, 1, 4, 4), 2, torch.device('cpu'))

    class Branchy(nn.Module):  # data-dependent control flow: fx cannot trace it; its conv can
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            y = self.conv(x)
            return y if y.sum() > 0 else -y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.part = Branchy()

        def forward(self, x):
            return self.part(x)
    with pytest.raises(UserError, match=r"does not trace.*largest sub-module that traces is 'part.conv'"):
        check_traceable(Net(), 'part')


def test_quantize_part_through_the_cli_on_canvases_from_idx_files(tmp_path, capsys):
    """data.type fashion_segmentation reads the four idx files (here written from the digits), the small FCN's
    backbone is quantized and results.json, the summary line and mrecg collect carry mIoU."""
    folder = tmp_path / 'fmnist'
    folder.mkdir()
    items, labels = digit_items(120)
    write_idx(folder, (items * 255).round().to(torch.uint8).numpy(), labels.numpy().astype(np.uint8))
    ckpt = tmp_path / 'fcn.pth'
    torch.manual_seed(0)
    torch.save(fcn_resnet_small().state_dict(), ckpt)
    cfg = {**TOY, 'model': {'type': 'mrecg.zoo.segmentation:fcn_resnet_small', 'path': str(ckpt),
                            'quantize_part': 'backbone'},
           'data': {'type': 'fashion_segmentation', 'path': str(folder), 'batch_size': 16,
                    'kwargs': {'count': 32, 'size': 48}},
           'eval': {'metric': 'miou'}}
    path = tmp_path / 'seg.yaml'
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / 'run'
    code, stdout, err = cli(['--config', str(path), '--output', str(out)], capsys)
    assert code == 0, err
    r = json.load(open(out / 'results.json'))
    assert r['metric'] == 'miou' and r['quantize_part'] == 'backbone' and r['quant_top1'] is None
    assert 0 <= r['quant_score'] <= 100 and r['scores']['quantized']['miou'] == r['quant_score']
    assert f'quantized miou {r["quant_score"]:.2f}' in stdout
    from mrecg.tools.collect import main as collect
    assert collect([str(out), '--out', str(tmp_path / 'table'), '--no-curves']) == 0
    assert (tmp_path / 'table.md').read_text().startswith('Mean IoU (%)')
    code, _, err = cli(['--config', str(path), '--output', str(tmp_path / 'x'), '--export', 'onnx'], capsys)
    assert code == 2 and 'not built yet' in err and len(err.strip().splitlines()) == 1


def write_idx(folder, images, labels):
    """Fashion-MNIST's four idx files (big-endian header, then the bytes)."""
    for split in ('train', 't10k'):
        (folder / f'{split}-images-idx3-ubyte').write_bytes(
            np.array([2051, len(images), 28, 28], '>i4').tobytes() + images.tobytes())
        (folder / f'{split}-labels-idx1-ubyte').write_bytes(np.array([2049, len(labels)], '>i4').tobytes()
                                                            + labels.tobytes())


def test_eval_metric_is_checked():
    with pytest.raises(mrecg.config.ConfigError, match='must be top1, miou, map or a function'):
        mrecg.config.Config.from_dict({'eval': {'metric': 'iou'}})
    with pytest.raises(mrecg.config.ConfigError, match='dotted module path'):
        mrecg.config.Config.from_dict({'model': {'quantize_part': 'backbone/body'}})


def test_a_user_metric_function(tmp_path):
    fn = tmp_path / 'score.py'
    fn.write_text('import torch\n'
                  'def pixels(model, data, device):\n'
                  '    x, y = data\n'
                  '    pred = model(x.to(device))["out"].argmax(1)\n'
                  '    return {"pixel_acc": 100.0 * (pred == y).float().mean().item(), "n": len(x)}\n')
    c = canvases(count=16)
    cfg = {**TOY, 'model': {'quantize_part': 'backbone'}, 'eval': {'metric': f'{fn}:pixels'}}
    r = mrecg.quantize(fcn_resnet_small().eval(), c.images, cfg, eval_data=(c.images, c.masks))
    assert r.accuracy.metric == 'pixel_acc' and r.accuracy.scores['n'] == 16 and 0 <= r.accuracy.score <= 100


# ---- VOC folders --------------------------------------------------------------------------------------------
def test_voc_folder_items_and_an_rgb_label_map_is_refused(tmp_path):
    from PIL import Image
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (tmp_path / d).mkdir(parents=True)
    label = np.zeros((30, 40), np.uint8)
    label[5:15, 10:30], label[0] = 3, 255
    for name in ('a', 'b'):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
            tmp_path / 'JPEGImages' / f'{name}.jpg')
        p = Image.fromarray(label, mode='P')
        p.putpalette([0, 0, 0, 128, 0, 0] * 128)
        p.save(tmp_path / 'SegmentationClass' / f'{name}.png')
    (tmp_path / 'ImageSets/Segmentation/train.txt').write_text('a\nb\n')
    cfg = DataConfig(type='voc', path=str(tmp_path), input_size=20, cali_transform='val')
    ds = dataset(cfg, 'train')
    image, mask = ds[0]
    assert image.shape == (3, 20, 20) and mask.shape == (20, 20) and mask.dtype == torch.long
    assert set(mask.unique().tolist()) == {0, 3, 255}
    assert dataset(cfg, 'val') is None
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / 'SegmentationClass' / 'b.png')
    with pytest.raises(UserError, match='class indices'):
        ds[1]


# ---- torchvision's networks at toy size ---------------------------------------------------------------------
SEGMENTATION = ['lraspp_mobilenet_v3_large', 'deeplabv3_mobilenet_v3_large']


@pytest.mark.parametrize('name', SEGMENTATION)
def test_torchvision_segmentation_backbone_quantizes_and_scores(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                          num_classes=CLASSES).eval()
    c = canvases(count=16, size=64, channels=3)
    cfg = {**TOY, 'model': {'quantize_part': 'backbone'}, 'eval': {'metric': 'miou'}}
    r = mrecg.quantize(model, c.images, cfg, eval_data=(c.images, c.masks))
    assert isinstance(r.model.backbone, torch.fx.GraphModule) and r.accuracy.score is not None
    assert len(r.unit_names) > 5


def test_a_detectors_backbone_and_fpn_quantize_on_its_transformed_images():
    """Faster R-CNN's backbone + FPN: its inputs are the detector's own resized, normalised, padded batch."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=CLASSES, min_size=64, max_size=64).eval()
    c = canvases(count=16, size=64, channels=3)
    r = mrecg.quantize(model, c.images, {**TOY, 'model': {'quantize_part': 'backbone'},
                                         'data': {'batch_size': 16, 'evaluate': False}})
    assert isinstance(r.model.backbone, torch.fx.GraphModule) and r.unit_names[-1].endswith('fpn')
    with torch.no_grad():
        out = r.model(list(c.images[:2]))
    assert len(out) == 2 and {'boxes', 'labels', 'scores'} <= set(out[0])


@pytest.mark.parametrize('config,last,head', [
    ('configs/segmentation/fcn_small_2_4.yaml', 'layer3.1', 'classifier.0'),
    ('configs/segmentation/deeplabv3_resnet50_voc_4_4.yaml', 'layer4', 'aux_classifier'),
    ('configs/detection/fasterrcnn_resnet50_fpn_4_4.yaml', 'fpn', 'rpn')])
def test_plan_of_a_part_lists_the_parts_units_only(config, last, head, capsys):
    """--plan needs neither data nor weights: the shipped configs (paths still to fill in) plan their part."""
    code, out, err = cli(['--config', os.path.join(ROOT, config), '--plan'], capsys)
    assert code == 0, err
    assert last in out and head not in out and 'reconstruction units' in out


# ---- detection: COCO-format data, the canvases' boxes, mAP --------------------------------------------------
def test_coco_map_of_perfect_shifted_and_missing_detections():
    from mrecg.detection import coco_map
    targets = [{'boxes': torch.tensor([[4.0, 4, 20, 20], [30, 30, 60, 50]]), 'labels': torch.tensor([1, 2]),
                'iscrowd': torch.zeros(2, dtype=torch.long)}]
    perfect = [{'boxes': targets[0]['boxes'], 'labels': torch.tensor([1, 2]), 'scores': torch.tensor([0.9, 0.8])}]
    assert coco_map(targets, perfect, (64, 64))['map'] == pytest.approx(100.0)
    shifted = [{**perfect[0], 'boxes': perfect[0]['boxes'] + 2}]  # IoU 0.62 and 0.75
    s = coco_map(targets, shifted, (64, 64))
    assert 0 < s['map'] < 100 and s['map_50'] == pytest.approx(100.0)
    wrong_class = [{**perfect[0], 'labels': torch.tensor([2, 1])}]
    assert coco_map(targets, wrong_class, (64, 64))['map'] == 0.0


def test_coco_folder_items_scale_and_flip_their_boxes(tmp_path):
    from PIL import Image
    from mrecg.detection import coco_detection
    (tmp_path / 'train').mkdir()
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / 'train' / 'a.jpg')
    coco = {'images': [{'id': 7, 'file_name': 'a.jpg', 'width': 100, 'height': 50}],
            'annotations': [{'id': 1, 'image_id': 7, 'category_id': 3, 'bbox': [10, 5, 40, 20], 'iscrowd': 0},
                            {'id': 2, 'image_id': 7, 'category_id': 1, 'bbox': [0, 0, 0, 4], 'iscrowd': 0}],
            'categories': [{'id': 1}, {'id': 3}]}
    (tmp_path / 'train.json').write_text(json.dumps(coco))
    cfg = DataConfig(type='coco', path=str(tmp_path), input_size=50, cali_transform='val')
    image, target = coco_detection(cfg, 'train')[0]
    assert image.shape == (3, 50, 50) and 0 <= image.min() and image.max() <= 1
    assert target['boxes'].tolist() == [[5.0, 5.0, 25.0, 25.0]] and target['labels'].tolist() == [3]  # empty box gone
    flipped = coco_detection(DataConfig(type='coco', path=str(tmp_path), input_size=50), 'train')
    torch.manual_seed(0)
    boxes = {tuple(flipped[0][1]['boxes'][0].tolist()) for _ in range(8)}
    assert boxes == {(5.0, 5.0, 25.0, 25.0), (25.0, 5.0, 45.0, 25.0)}
    assert coco_detection(cfg, 'val') is None


def test_a_small_detectors_backbone_quantizes_and_is_scored_by_map():
    from mrecg.detection import TargetList
    from mrecg.zoo.detection import fcos_resnet_small
    torch.manual_seed(0)
    c = canvases(count=16, size=64)
    images = c.images * 0.30 + 0.15
    targets = [{'boxes': b, 'labels': lab, 'iscrowd': torch.zeros(len(lab), dtype=torch.long)}
               for b, lab in zip(c.boxes, c.labels)]
    data = TargetList(images, targets)
    cfg = {**TOY, 'model': {'quantize_part': 'backbone'}, 'eval': {'metric': 'map'}}
    r = mrecg.quantize(fcos_resnet_small().eval(), data, cfg, eval_data=data)
    assert isinstance(r.model.backbone, torch.fx.GraphModule) and r.unit_names[-1].endswith('fpn')
    assert r.accuracy.metric == 'map' and set(r.accuracy.scores) == {'map', 'map_50', 'map_75'}
    assert 0 <= r.accuracy.score <= 100 and 'map' in str(r)


def test_top1_on_a_detector_says_which_metric_to_set():
    from mrecg.detection import TargetList
    from mrecg.zoo.detection import fcos_resnet_small
    c = canvases(count=16, size=64)
    data = TargetList(c.images, [{'boxes': b, 'labels': lab} for b, lab in zip(c.boxes, c.labels)])
    with pytest.raises(UserError, match='set eval.metric to miou .segmentation., map'):
        mrecg.quantize(fcos_resnet_small().eval(), data, {**TOY, 'model': {'quantize_part': 'backbone'}},
                       eval_data=data)


def test_fashion_detection_items_are_images_in_0_1_and_their_boxes(tmp_path):
    items, labels = digit_items(60)
    write_idx(tmp_path, (items * 255).round().to(torch.uint8).numpy(), labels.numpy().astype(np.uint8))
    ds = dataset(DataConfig(type='fashion_detection', path=str(tmp_path), kwargs={'count': 8, 'size': 48}), 'val')
    image, target = ds[0]
    assert len(ds) == 8 and image.shape == (1, 48, 48) and image.min() >= 0 and image.max() <= 1
    assert target['boxes'].shape[1] == 4 and len(target['labels']) == len(target['boxes']) >= 1
    assert target['labels'].min() >= 1  # 0 is the background
