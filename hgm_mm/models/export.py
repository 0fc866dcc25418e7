"""Inference copies of a model's image path, for embedding many photos.

`FoldedImageEncoder` is `model.encode_image` through a tower copy with its BatchNorms folded into
their convolutions, channels-last. `OnnxImageEncoder` exports that copy to ONNX and runs it with
ONNX Runtime on a CPU (benchmarks/bench_embed.py measures the whole catalogue pass against a
plain loop). Both are checked against the model's own output on a probe batch when built.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class FoldedImageEncoder(nn.Module):
    """`model.encode_image` on pixels (B, 3, S, S) -> unit vectors (B, D), through a copy of the
    image tower made for inference.

    Each BatchNorm that reads a convolution's output directly is folded into that convolution
    (`torch.nn.utils.fusion.fuse_conv_bn_eval`), and the copy runs channels-last: both save CPU
    time in every forward pass (benchmarks/bench_embed.py measures the engines). A
    tower without such pairs is used as it is; a folded copy whose output strays from the
    original's on a probe is discarded.
    """

    def __init__(self, model):
        super().__init__()
        self.project = model.image_proj
        self.image_size = model.config.image_tower.image_size
        self.tower = folded_copy(model.image_tower, self.image_size, model.device)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):  # fixed paddings fit this size only
            raise ValueError(f"pixels of {tuple(pixels.shape[-2:])}; this encoder takes "
                             f"{self.image_size}x{self.image_size}")
        features = self.tower(pixels.contiguous(memory_format=torch.channels_last))  # (B, C)
        return F.normalize(self.project(features), dim=-1)  # (B, D)


class FoldedRoomMapEncoder(nn.Module):
    """`model.encode_room_views` for rooms seen as one feature map (`room_views="feature_map"`):
    room photos (R, 3, M, M) -> unit view vectors (R, V, D), through the folded tower copy."""

    def __init__(self, model):
        super().__init__()
        self.project = model.image_proj
        self.grids = tuple(model.config.room_grids)
        self.image_size = model.room_views.size
        self.tower = folded_copy(model.image_tower, self.image_size, model.device)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"room pixels of {tuple(pixels.shape[-2:])}; this encoder takes "
                             f"{self.image_size}x{self.image_size}")
        features = self.tower.region_features(pixels.contiguous(memory_format=torch.channels_last), self.grids)
        return F.normalize(self.project(features), dim=-1)  # (R, V, D)


def folded_copy(tower: nn.Module, image_size: int, device: torch.device, *, prefix_stage: int = 0) -> nn.Module:
    """A channels-last copy of `tower` in eval mode with conv -> BatchNorm pairs folded, for inputs of
    `image_size`; `tower` itself when none fold. It computes what the eval-mode tower computes (to
    float rounding). With `prefix_stage` > 0 its `prefix_features(pixels, prefix_stage)` is checked
    too (a BatchNorm folded into a convolution of an earlier stage would move across the cut)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    probe = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    pairs, input_sizes = _probe_convolutions(tower, probe)
    if not pairs:
        return tower
    copy_of = copy.deepcopy(tower).eval()
    modules = dict(copy_of.named_modules())
    for conv_name, norm_name in pairs:
        _set_submodule(copy_of, conv_name, fuse_conv_bn_eval(modules[conv_name], modules[norm_name]))
        _set_submodule(copy_of, norm_name, _after_norm(modules[norm_name]))
    for name, module in dict(copy_of.named_modules()).items():
        if type(module).__name__ == "Conv2dSame" and name in input_sizes:
            _set_submodule(copy_of, name, _static_same_padding(module, input_sizes[name]))
    copy_of = copy_of.to(memory_format=torch.channels_last)
    probe_cl = probe.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        checks = [(tower(probe), copy_of(probe_cl))]
        if prefix_stage:
            checks.append((tower.prefix_features(probe, prefix_stage), copy_of.prefix_features(probe_cl, prefix_stage)))
    for expected, got in checks:
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3,
                                                             atol=1e-3 * float(expected.abs().max())):
            return tower  # a pair the data flow did not allow folding (e.g. a conv output also used elsewhere)
    return copy_of


LOCKED_PASS_PHOTOS = 16  # photos per pass through locked layers: small passes ran faster than all of a room's views in one


@torch.no_grad()
def locked_outputs(tower: nn.Module, pixels: torch.Tensor, stage: int | None = None) -> torch.Tensor:
    """Pixels (N, 3, S, S) -> the pooled tower output (`stage` None) or the activation entering
    `stage` (`TimmImageTower.prefix_features`), run channels-last in passes of `LOCKED_PASS_PHOTOS`;
    `tower` is usually a `folded_copy`. Returns a contiguous tensor on the tower's device."""
    outputs = []
    for chunk in pixels.contiguous(memory_format=torch.channels_last).split(LOCKED_PASS_PHOTOS):
        outputs.append((tower(chunk) if stage is None else tower.prefix_features(chunk, stage)).contiguous())
    return torch.cat(outputs)


def _probe_convolutions(tower: nn.Module, probe: torch.Tensor
                           ) -> tuple[list[tuple[str, str]], dict[str, tuple[int, int]]]:
    """(conv name, norm name) for each eval-mode BatchNorm2d whose input is a Conv2d's output, seen
    on a probe forward, modules called more than once left out; and each conv's input (H, W)."""
    names = {module: name for name, module in tower.named_modules()}
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # id(output) -> (conv, output kept alive)
    calls: dict[nn.Module, int] = {}
    pairs: list[tuple[nn.Module, nn.Module]] = []
    input_sizes: dict[str, tuple[int, int]] = {}

    def after_conv(module, inputs, output):
        calls[module] = calls.get(module, 0) + 1
        outputs[id(output)] = (module, output)
        input_sizes[names[module]] = tuple(inputs[0].shape[-2:])

    def before_norm(module, inputs):
        calls[module] = calls.get(module, 0) + 1
        producer = outputs.get(id(inputs[0]))
        if producer is not None and producer[1] is inputs[0]:
            pairs.append((producer[0], module))

    hooks = []
    for module in names:
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        elif _foldable_norm(module):
            hooks.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.inference_mode():
            tower(probe)
    finally:
        for hook in hooks:
            hook.remove()
    pairs = [(names[conv], names[norm]) for conv, norm in pairs if calls[conv] == 1 and calls[norm] == 1]
    return pairs, input_sizes


def _static_same_padding(conv: nn.Conv2d, input_size: tuple[int, int]) -> nn.Module:
    """timm's Conv2dSame (TensorFlow "SAME" padding, worked out from the input size on every call)
    as a fixed zero padding and a plain convolution, for inputs of `input_size`: the exported graph
    then holds constant pads that ONNX Runtime folds into the convolution, instead of shape
    arithmetic (with that arithmetic, the exported EfficientNet-Lite0 graph ran about 30% slower)."""
    pads = []
    for size, kernel, stride, dilation in zip(input_size, conv.kernel_size, conv.stride, conv.dilation):
        total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                      conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    plain.load_state_dict(conv.state_dict())
    return nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), plain)


def _foldable_norm(module: nn.Module) -> bool:
    """An eval-mode BatchNorm2d with running statistics: plain, or timm's BatchNormAct2d."""
    plain = type(module) is nn.BatchNorm2d
    with_act = type(module).__name__ == "BatchNormAct2d" and hasattr(module, "act") and hasattr(module, "drop")
    return (plain or with_act) and not module.training and module.running_mean is not None


def _after_norm(norm: nn.Module) -> nn.Module:
    """What remains of a norm once folded: timm's BatchNormAct2d keeps its dropout and activation."""
    return nn.Sequential(norm.drop, norm.act) if type(norm) is not nn.BatchNorm2d else nn.Identity()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


ONNX_ATOL = 1e-4  # largest difference of a unit-vector component between ONNX Runtime and torch on the probe


class OnnxExportError(RuntimeError):
    """The image path could not be exported to ONNX, or the export computes something else."""


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the ONNX exporter's packages are installed."""
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


class OnnxImageEncoder:
    """Pixels (B, 3, S, S) -> unit vectors (B, D) like `model.encode_image`, run by ONNX Runtime on a CPU;
    with `room_map`, room photos (R, 3, M, M) -> view vectors (R, V, D) like `model.encode_room_views`.

    The folded image path is exported once, when this is built (about a second for
    EfficientNet-Lite0), and checked against `encode_image` on a probe batch. The ONNX Runtime
    session uses as many threads as torch has in this process.
    ONNX Runtime is not fork-safe: a forked child that starts a session after its parent did can
    hang, so run the encoder in the process that built it (catalogue embedding does, while its
    worker processes decode) or in a spawned one (a pickled copy builds a fresh session).

    Raises:
        OnnxExportError: the export failed or its output strays from `encode_image`'s.
        ImportError: onnxruntime, onnx or onnxscript is not installed.
    """

    def __init__(self, model, *, room_map: bool = False):
        import onnxruntime  # noqa: F401  (missing: fail before the export's seconds)

        if model.device.type != "cpu":
            raise ValueError(f"OnnxImageEncoder runs on the CPU; the model is on {model.device}")
        image_size = model.room_views.size if room_map else model.config.image_tower.image_size
        probe = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        encoder = (FoldedRoomMapEncoder if room_map else FoldedImageEncoder)(model).eval()
        self.onnx_model = _export(encoder, probe)
        self._session = None
        reference = model.encode_room_views if room_map else model.encode_image
        with torch.inference_mode():
            expected = reference(probe.to(model.device)).float().cpu()  # (3, D), room maps (3, V, D)
        got = self(probe)
        if not torch.allclose(got, expected, rtol=0, atol=ONNX_ATOL):
            difference = (got - expected).abs().max().item()
            raise OnnxExportError(f"the ONNX image path differs from {reference.__name__} by {difference:.2e} "
                                  f"(allowed {ONNX_ATOL:.0e}); embed with engine='torch'")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        session = self._current_session()
        (vectors,) = session.run(None, {session.get_inputs()[0].name: pixels.float().cpu().numpy()})
        return torch.from_numpy(vectors)  # (B, D)

    def _current_session(self):
        if self._session is None:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            # idle threads sleep instead of spinning: decoding processes share the cores, and a
            # spinning thread takes their time
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = onnxruntime.InferenceSession(self.onnx_model, options,
                                                         providers=["CPUExecutionProvider"])
        return self._session

    def __getstate__(self) -> dict:  # a session cannot be pickled; a spawned process builds its own
        return {**self.__dict__, "_session": None}


def _export(encoder: nn.Module, probe: torch.Tensor) -> bytes:
    """The ONNX model (serialised) of `encoder`, with a dynamic batch dimension.

    torch's TorchScript-based exporter is tried first: it exports EfficientNet-Lite0 several times
    faster than the `torch.export`-based one, and both graphs run equally fast once the paddings
    are fixed. torch has deprecated it; where it fails
    or is gone, the `torch.export`-based exporter is used.
    """
    errors = []
    for name, exporter in (("TorchScript", _export_torchscript), ("torch.export", _export_torch_export)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation notices; the exporters narrate their passes
                return exporter(encoder, probe)
        except Exception as err:  # the exporters raise many types; any of them means "try the next"
            errors.append(f"{name} exporter: {type(err).__name__}: {err}")
    raise OnnxExportError(f"the image path could not be exported to ONNX ({'; '.join(errors)}); "
                          "embed with engine='torch'")


def _export_torchscript(encoder: nn.Module, probe: torch.Tensor) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.onnx.export(encoder, (probe,), buffer, dynamo=False, input_names=["pixels"], output_names=["vectors"],
                      dynamic_axes={"pixels": {0: "batch"}, "vectors": {0: "batch"}})
    return buffer.getvalue()


def _export_torch_export(encoder: nn.Module, probe: torch.Tensor) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(encoder, (probe,), dynamo=True, dynamic_shapes=({0: batch},),
                                input_names=["pixels"], output_names=["vectors"], verbose=False)
    return program.model_proto.SerializeToString()
