"""Model registry, checkpoint loading by name, and unit partitions for every registered model."""
import os

import pytest
import torch
import torchvision

from mrecg import zoo
from mrecg.config import QuantizeConfig
from mrecg.quantization import fold_bn, prepare_model
from mrecg.units import UnitPartition, layer_base_units, model_base_units

SETTINGS = QuantizeConfig(w_qconfig={'bit': 4, 'p': 2.0}, a_qconfig={'bit': 4, 'p': 2.0})
ALL_MODELS = zoo.list_models()


def test_registry_has_the_paper_models():
    assert {'resnet18', 'resnet50', 'mobilenet_v2', 'regnetx_600m'} <= set(ALL_MODELS)


def test_unknown_model_and_kwarg_are_rejected():
    with pytest.raises(ValueError, match='unknown model type'):
        zoo.build_model('resnet19')
    with pytest.raises(ValueError, match="takes no argument 'width'"):
        zoo.build_model('resnet18', width=2)


@pytest.mark.parametrize('name', ALL_MODELS)
@pytest.mark.parametrize('fold', [True, False])
def test_block_partition_covers_every_node(name, fold):
    """Every graph node of the prepared model belongs to exactly one unit, units are in graph order, and
    each unit reads one cached tensor and hands one on (the chain the engine propagates)."""
    model = zoo.build_model(name).eval()
    if fold:
        fold_bn(model)
    qmodel = prepare_model(model, SETTINGS)
    units = model_base_units(model)
    part = UnitPartition.build(qmodel, units)
    nodes = [n for n in qmodel.graph.nodes if n.op not in ('placeholder', 'output')]
    assert set(part.owner) == set(nodes)
    assert sorted(set(part.owner.values())) == list(range(len(units)))
    for i in range(len(units)):
        assert len(part.inputs_of(i, i)) == 1 and len(part.outputs_of(i, i)) == 1
    # every conv/linear's weight quantizer lies in some unit
    weight_layers = {n for n in nodes if n.op == 'call_module' and hasattr(dict(qmodel.named_modules())[n.target],
                                                                           'weight_fake_quant')}
    assert weight_layers <= set(part.owner)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_head_ops_in_the_last_block_as_mqbench(name):
    """quantize.reconstruction.head_ops: last_block: the last unit starts at its first weight layer; what
    came before it (pooling, flatten, the classifier's input quantizer) now ends the unit before."""
    model = zoo.build_model(name).eval()
    qmodel = prepare_model(model, SETTINGS)
    units = model_base_units(model)
    default, mqbench = UnitPartition.build(qmodel, units), UnitPartition.build(qmodel, units, 'last_block')
    mods = dict(qmodel.named_modules())
    last = len(units) - 1
    first = mqbench.nodes_of(last, last)[0]
    assert first.op == 'call_module' and hasattr(mods[first.target], 'weight_fake_quant')
    moved = [n for n in default.nodes_of(last, last) if n not in mqbench.nodes_of(last, last)]
    assert all(mqbench.owner[n] == last - 1 for n in moved)
    assert [n.name for n in mqbench.outputs_of(last - 1, last - 1)] == [moved[-1].name if moved else
                                                                     default.outputs_of(last - 1, last - 1)[0].name]
    if zoo.registry_family(name) == 'resnet':  # the pooled, quantized tensor is what the last block hands on
        assert [n.name for n in moved] == ['avgpool', 'flatten', 'flatten_post_act_fake_quantizer']
    with pytest.raises(ValueError, match='head_ops'):
        UnitPartition.build(qmodel, units, 'pool')


@pytest.mark.parametrize('name', ALL_MODELS)
def test_layer_partition_has_one_weight_layer_per_unit(name):
    qmodel = prepare_model(zoo.build_model(name).eval(), SETTINGS)
    units = layer_base_units(qmodel)
    part = UnitPartition.build(qmodel, units)
    mods = dict(qmodel.named_modules())
    for i in range(len(units)):
        layers = [n for n in part.nodes_of(i, i) if n.op == 'call_module' and hasattr(mods[n.target], 'weight_fake_quant')]
        assert len(layers) == 1


EXPECTED_UNITS = {'resnet18': 10, 'resnet50': 18, 'mobilenet_v2': 18, 'regnetx_600m': 18}


@pytest.mark.parametrize('name,count', sorted(EXPECTED_UNITS.items()))
def test_plain_unit_counts_match_the_authors(name, count):
    assert len(model_base_units(zoo.build_model(name))) == count


@pytest.mark.parametrize('width,params', [(1.0, 3504872), (0.75, 2636424), (0.5, 1968680), (0.35, 1677128)])
def test_mobilenet_v2_width_multipliers(width, params):
    """Channel counts follow the make-divisible-by-8 rule of the published width-multiplier checkpoints."""
    model = zoo.build_model('mobilenet_v2', width_mult=width)
    assert sum(p.numel() for p in model.parameters()) == params


def _save(tmp_path, obj, name='ckpt.pth'):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize('layout', ['bare', 'model', 'state_dict_module'])
def test_checkpoint_layouts_load_by_name(tmp_path, layout):
    src = zoo.build_model('resnet_small').eval()
    sd = src.state_dict()
    obj = {'bare': sd, 'model': {'model': sd, 'epoch': 3},
           'state_dict_module': {'state_dict': {'module.' + k: v for k, v in sd.items()}}}[layout]
    dst = zoo.build_model('resnet_small').eval()
    zoo.load_checkpoint(dst, _save(tmp_path, obj), 'resnet')
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(src(x), dst(x))


def test_torchvision_checkpoints_load_by_name(tmp_path):
    for ours, theirs in (('resnet18', torchvision.models.resnet18()), ('mobilenet_v2', torchvision.models.mobilenet_v2())):
        theirs.eval()
        model = zoo.build_model(ours).eval()
        zoo.load_checkpoint(model, _save(tmp_path, theirs.state_dict(), ours), zoo.model_entry(ours).family)
        x = torch.randn(1, 3, 64, 64)
        assert torch.allclose(model(x), theirs(x), atol=1e-5)


def test_dli14_mobilenet_v2_layout_loads_by_name(tmp_path):
    """d-li14's width-multiplier checkpoints name the last 1x1 conv ``conv.*`` and the classifier bare."""
    src = zoo.build_model('mobilenet_v2', width_mult=0.5).eval()
    renamed = {k.replace('features.18.', 'conv.').replace('classifier.1.', 'classifier.'): v
               for k, v in src.state_dict().items()}
    dst = zoo.build_model('mobilenet_v2', width_mult=0.5).eval()
    zoo.load_checkpoint(dst, _save(tmp_path, renamed), 'mobilenet_v2')
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(src(x), dst(x))


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    sd = zoo.build_model('resnet_small').state_dict()
    sd.pop('fc.bias')
    sd['extra.weight'] = torch.zeros(1)
    with pytest.raises(zoo.CheckpointError) as err:
        zoo.load_checkpoint(zoo.build_model('resnet_small'), _save(tmp_path, sd), 'resnet')
    msg = str(err.value)
    assert 'missing 1 keys: fc.bias' in msg and 'unexpected 1 keys: extra.weight' in msg


def test_checkpoint_shape_mismatch_and_missing_file(tmp_path):
    wrong = zoo.build_model('mobilenet_v2', width_mult=0.5).state_dict()
    with pytest.raises(zoo.CheckpointError, match='shape mismatch: features.0.0.weight'):
        zoo.load_checkpoint(zoo.build_model('mobilenet_v2'), _save(tmp_path, wrong), 'mobilenet_v2')
    with pytest.raises(zoo.CheckpointError, match='not found'):
        zoo.load_checkpoint(zoo.build_model('resnet18'), os.path.join(str(tmp_path), 'nope.pth'))


def test_checkpoint_with_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would construct arbitrary objects is not executed."""
    path = _save(tmp_path, {'model': zoo.build_model('resnet_small')})  # a pickled nn.Module, not tensors
    with pytest.raises(zoo.CheckpointError, match='cannot read checkpoint'):
        zoo.load_checkpoint(zoo.build_model('resnet_small'), path)
