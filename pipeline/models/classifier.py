"""`ImageClassifier`: one interface over timm models and users' own modules.

Every teacher and student in the pipeline is an `ImageClassifier`:

- ``embed(x) -> (B, D)``: the penultimate embedding (what the teacher cache stores);
- ``classify(e) -> (B, C)``: logits from an embedding;
- ``forward(x) = classify(embed(x))``: so cached logits are by construction the head applied
  to the cached embedding;
- ``embed_dim`` (D) and ``num_classes`` (C).

A **timm model** is wrapped as ``embed = forward_head(forward_features(x), pre_logits=True)``,
``classify = get_classifier()``, ``embed_dim = head_hidden_size`` (``num_features`` where the
model has no ``head_hidden_size``).

A **user module** (from a ``"package.module:function"`` entrypoint) must expose this small
interface::

    class MyNet(nn.Module):
        embed_dim: int                                   # D, an int attribute or property
        def embed(self, x: Tensor) -> Tensor: ...        # (B, in_chans, H, W) -> (B, D)
        def classify(self, e: Tensor) -> Tensor: ...     # (B, D) -> (B, num_classes)
        # optional: num_classes: int, forward(x) (compared by logits_from_embedding_check),
        #           get_classifier() -> nn.Module (lets load_weights(drop_head=True) find the head)

`pipeline.models.cifar_resnet.CifarResNet` is an example. An entrypoint may also return a timm
model (anything with forward_features / forward_head / get_classifier): it is wrapped as above.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.errors import ModelInterfaceError

__all__ = ["ImageClassifier", "is_timm_model", "weights_module"]

_TIMM_MEMBERS = ("forward_features", "forward_head", "get_classifier")
_USER_MEMBERS = ("embed", "classify")


def is_timm_model(module: nn.Module) -> bool:
    """Whether ``module`` has timm's feature/head API (forward_features, forward_head, get_classifier)."""
    return all(callable(getattr(module, name, None)) for name in _TIMM_MEMBERS)


def _check_user_module(module: object, origin: str) -> int:
    """Validate the user interface; return ``embed_dim``."""
    if not isinstance(module, nn.Module):
        raise ModelInterfaceError(
            f"{origin} returned a {type(module).__name__}, expected a torch.nn.Module "
            "with embed(x), classify(e) and an int embed_dim"
        )
    for name in _USER_MEMBERS:
        if not callable(getattr(module, name, None)):
            raise ModelInterfaceError(
                f"{origin} returned {type(module).__name__}, which has no method {name}(); "
                "a user model must define embed(x) -> (B, D) penultimate features and "
                "classify(e) -> (B, num_classes) logits, plus an int attribute embed_dim = D "
                "(see pipeline.models.classifier for the interface)"
            )
    embed_dim = getattr(module, "embed_dim", None)
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ModelInterfaceError(
            f"{origin} returned {type(module).__name__}, whose embed_dim is {embed_dim!r}; "
            "set self.embed_dim = D (a positive int, the width of embed(x)) in __init__"
        )
    return embed_dim


class ImageClassifier(nn.Module):
    """A classifier split at the penultimate embedding; see the module docstring.

    The wrapped model is ``self.backbone``; weights files and `state_dict_sha256` use the
    backbone's keys, so files stay loadable by plain timm / the user's own code.
    """

    def __init__(self, backbone: nn.Module, *, num_classes: int | None = None, origin: str | None = None) -> None:
        """Wrap ``backbone``.

        ``num_classes`` is needed only for a user module without an int ``num_classes``
        attribute; where both exist they must agree. ``origin`` names the model in errors.
        """
        super().__init__()
        origin = origin or type(backbone).__name__
        self.backbone = backbone
        self.is_timm = is_timm_model(backbone)
        if self.is_timm:
            dim = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", None)
            if not isinstance(dim, int):
                raise ModelInterfaceError(f"{origin}: timm model without an int head_hidden_size or num_features")
            self._embed_dim = dim
        else:
            self._embed_dim = _check_user_module(backbone, origin)
        own = getattr(backbone, "num_classes", None)
        if isinstance(own, int) and not isinstance(own, bool):
            if num_classes is not None and num_classes != own:
                raise ModelInterfaceError(
                    f"{origin}: asked for num_classes={num_classes} but the model reports "
                    f"num_classes={own}; the entrypoint must honour its num_classes argument"
                )
            self._num_classes = own
        elif num_classes is not None:
            self._num_classes = num_classes
        else:
            raise ModelInterfaceError(
                f"{origin}: cannot tell the number of classes: give the module an int num_classes "
                "attribute or pass num_classes= to ImageClassifier"
            )

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, embed_dim) penultimate embedding."""
        if self.is_timm:
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.backbone.embed(x)

    def classify(self, e: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) -> (B, num_classes) logits."""
        if self.is_timm:
            return self.backbone.get_classifier()(e)
        return self.backbone.classify(e)

    def get_classifier(self) -> nn.Module | None:
        """The head module when the backbone names one (timm, CifarResNet), else None."""
        get_classifier = getattr(self.backbone, "get_classifier", None)
        return get_classifier() if callable(get_classifier) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    def has_native_forward(self) -> bool:
        """Whether the backbone defines its own forward (always true for timm models)."""
        return type(self.backbone).forward is not nn.Module.forward

    def extra_repr(self) -> str:
        kind = "timm" if self.is_timm else "user"
        return f"kind={kind}, embed_dim={self.embed_dim}, num_classes={self.num_classes}"


# How far classify(e) may be from the head's e @ W.T + b (float32 rounding only).
HEAD_ATOL = 1e-4


@torch.inference_mode()
def linear_head(model: ImageClassifier, x: torch.Tensor, *, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's classifier as one linear map: float32 CPU weight (C, D) and bias (C,)
    (zeros when it has none). A :class:`ModelInterfaceError` unless ``get_classifier()`` is an
    ``nn.Linear(D, C)`` that ``classify`` applies as is (compared on the embeddings of ``x``)."""
    fix = "keep the logits in the cache instead (embed.logits: stored)"
    head = model.get_classifier()
    if not isinstance(head, nn.Linear) or tuple(head.weight.shape) != (model.num_classes, model.embed_dim):
        raise ModelInterfaceError(f"{source}: the classifier is {type(head).__name__ if head is not None else 'not named'}"
                                  f", not one Linear({model.embed_dim}, {model.num_classes}); {fix}")
    weight = head.weight.detach().float().cpu()
    bias = head.bias.detach().float().cpu() if head.bias is not None else torch.zeros(model.num_classes)
    e = model.embed(x).float()
    err = float((model.classify(e).float().cpu() - torch.nn.functional.linear(e.cpu(), weight, bias)).abs().max())
    if err > HEAD_ATOL:
        raise ModelInterfaceError(f"{source}: classify(embedding) differs from embedding @ weight.T + bias by "
                                  f"{err:.3g} (the head does more than one linear map); {fix}")
    return weight, bias


def weights_module(module: nn.Module) -> nn.Module:
    """The module whose state dict is saved/loaded/hashed: an ImageClassifier's backbone."""
    return module.backbone if isinstance(module, ImageClassifier) else module
