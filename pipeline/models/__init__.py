"""Teachers and students behind one interface: timm names or ``"package.module:function"``.

See `pipeline.models.classifier` for the interface (``embed``, ``classify``, ``embed_dim``)
a user's own module must expose, and `pipeline.models.factory` for building, saving and
loading models, and `pipeline.models.files` for the safetensors + JSON file format.
"""

from pipeline.models.classifier import ImageClassifier, linear_head
from pipeline.models.errors import (
    EntrypointRefusedError,
    ModelError,
    ModelFileError,
    ModelInterfaceError,
    ModelNotFoundError,
    WeightsMismatchError,
)
from pipeline.models.factory import (
    MODEL_FILE_FORMAT,
    build_model,
    check_entrypoint,
    library_versions,
    load_model,
    logits_from_embedding_check,
    save_model,
)
from pipeline.models.weights import (
    file_sha256,
    load_weights,
    read_state_dict,
    state_dict_sha256,
)

__all__ = [
    "MODEL_FILE_FORMAT",
    "EntrypointRefusedError",
    "ImageClassifier",
    "linear_head",
    "ModelError",
    "ModelFileError",
    "ModelInterfaceError",
    "ModelNotFoundError",
    "WeightsMismatchError",
    "build_model",
    "check_entrypoint",
    "file_sha256",
    "library_versions",
    "load_model",
    "load_weights",
    "logits_from_embedding_check",
    "read_state_dict",
    "save_model",
    "state_dict_sha256",
]
