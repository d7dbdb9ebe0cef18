"""Model zoo: ImageNet ResNet-18/50, MobileNetV2 (x1.0/0.75/0.5/0.35), RegNetX-600MF, and small models for
the built-in digits and Fashion-MNIST data; plus any torchvision, timm or user model by ``create_model``."""
from mrecg.zoo.registry import build_model, list_models, model_entry, model_kwargs_error, register_model  # noqa: F401
from mrecg.zoo import mobilenet_v2, regnet, resnet  # noqa: F401  (registers the models)
from mrecg.zoo.checkpoint import CheckpointError, load_checkpoint  # noqa: F401
from mrecg.zoo.sources import create_model, registry_family  # noqa: F401
