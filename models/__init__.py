"""Model zoo: ImageNet ResNet-18/50, MobileNetV2 (x1.0/0.75/0.5/0.35), RegNetX-600MF, and small models
for the built-in digits and Fashion-MNIST data. ``build_model(name, **kwargs)`` is the one way in."""
from models.registry import build_model, list_models, model_entry, model_kwargs_error, register_model  # noqa: F401
from models import mobilenet_v2, regnet, resnet  # noqa: F401  (registers the models)
from models.checkpoint import CheckpointError, load_checkpoint  # noqa: F401
