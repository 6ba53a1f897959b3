"""What is trained: CIFAR CNNs by lowercase name (``create_model('resnet18', num_classes=10)``)."""
from model_zoo import cnn, resnet, se_cnn  # noqa: F401  (importing registers the models)
from model_zoo.registry import ModelEntry, create_model, get_entry, gradcam_target, list_models, register_model

__all__ = ["ModelEntry", "create_model", "get_entry", "gradcam_target", "list_models", "register_model"]
