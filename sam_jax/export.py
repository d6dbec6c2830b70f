"""Deployable exports of a sam_jax checkpoint: StableHLO (jax.export) or ONNX.

  python -m sam_jax.export --checkpoint ckpt/vit_b --output export/vit_b --format onnx
  python -m sam_jax.export --checkpoint ckpt/vit_b --output export/vit_b_hlo --format stablehlo

Two programs, with the weights inside them:
  encoder: images (B, S, S, 3) float32 RGB in [0, 255] -> image_embeddings (B, C, h, w),
           the batch B dynamic. An image resized so that its longest side is S is
           padded (bottom, right) with the pixel mean, which normalises to the zeros
           the model pads with.
  decoder: Meta's ONNX decoder (segment_anything.utils.onnx.SamOnnxModel) for any
           number of points N: image_embeddings (1, C, h, w), point_coords (1, N, 2),
           point_labels (1, N), mask_input (1, 1, 4h, 4w), has_mask_input (1,),
           orig_im_size (2,) -> masks (1, M, H0, W0), iou_predictions (1, M),
           low_res_masks (1, M, 4h, 4w); M = 4 (the single-mask output, then the three).

The decoder's `masks` have the size given by the *values* of orig_im_size, a
shape that no JAX program (static or symbolic shapes) can return: the ONNX
decoder appends that upscaling as ONNX Resize and Slice nodes after the
converted graph, exactly as Meta's export computes it; the StableHLO decoder
takes the other five inputs and returns iou_predictions and low_res_masks,
which the caller upscales (`Sam.postprocess_masks`). docs/export.md has the
details; export.json in the output lists every input and output.
"""

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import outputs
from sam_jax.checkpoint import CheckpointError, load_sam
from sam_jax.modeling.prompt_encoder import NOT_A_POINT
from sam_jax.modeling.sam import Sam
from sam_jax.outputs import OutputError

FORMATS = ("stablehlo", "onnx")
MANIFEST = "export.json"
ONNX_OPSET = 18  # jax2onnx 0.12 writes opset-18 reductions (axes as an input); onnxruntime >= 1.14 loads it
# ONNX protobufs stop at 2 GiB: larger weights go to a side file.
_ONNX_INLINE_LIMIT = 1_500_000_000
FILES = {
    "stablehlo": ("encoder.stablehlo", "decoder.stablehlo", MANIFEST),
    "onnx": ("encoder.onnx", "encoder.onnx.data", "decoder.onnx", "decoder.onnx.data", MANIFEST),
}


class ExportError(ValueError):
  """An export that cannot be made; the message says why and what to do."""


# ---------------------------------------------------------------------------- the programs

def encoder_fn(model: Sam, params) -> Callable:
  """images (B, S, S, 3) in [0, 255] -> image embeddings (B, C, h, w), NCHW as Meta's decoder takes them."""
  def encode(images):
    emb = model.apply({"params": params}, images, method=model.embed_images)
    return jnp.transpose(emb, (0, 3, 1, 2))
  return encode


def _embed(module: Sam, image_embeddings, point_coords, point_labels, mask_input,
           has_mask_input):
  """Meta's ONNX decoder inputs -> image embeddings (1, h, w, C), the dense prompt's
  embedding (1, h, w, C), point embeddings (1, N, C) and integer labels (1, N)."""
  pe = module.prompt_encoder
  emb = jnp.transpose(image_embeddings, (0, 2, 3, 1))
  # Meta's ONNX labels: -1 the not-a-point token, 0 and 1 points, 2 and 3 box corners;
  # below -1, padding that no attention sees.
  labels = jnp.round(point_labels).astype(jnp.int32)
  sparse = pe.embed_points(point_coords, labels)
  has = has_mask_input.reshape(-1, 1, 1, 1).astype(emb.dtype)
  dense = (has * pe.embed_masks(mask_input[:, 0])
           + (1 - has) * pe.no_mask_embed.embedding[0])
  return emb, dense, sparse, labels


def _decode_all(module: Sam, *inputs):
  emb, dense, sparse, labels = _embed(module, *inputs)
  masks, iou = module.mask_decoder(emb, module.prompt_encoder.get_dense_pe(), sparse[:, None],
                                   dense[:, None], "all", (labels >= NOT_A_POINT)[:, None])
  return iou[:, 0], masks[:, 0]


def _decode_in_slots(module: Sam, *inputs):
  """`_decode_all` on points whose first K = `mask_decoder.num_output_tokens` entries are
  only places for the decoder's own output tokens, which it writes there: the token
  axis is the input's length T, never a shape N + K computed from it, which
  jax2onnx 0.12.5 converts to a wrong constant (docs/export.md)."""
  emb, dense, sparse, labels = _embed(module, *inputs)
  out, k = module.mask_decoder.output_tokens(), module.mask_decoder.num_output_tokens
  # An iota rather than jnp.arange: jax2onnx replaces arange of a symbolic length.
  slot = jax.lax.broadcasted_iota(jnp.int32, labels.shape, 1)
  tokens = jnp.where((slot < k)[..., None], out[jnp.minimum(slot, k - 1)], sparse)
  mask = (slot < k) | (labels >= NOT_A_POINT)  # no Where on booleans: onnxruntime lacks it
  masks, iou = module.mask_decoder.decode_tokens(
      (emb + dense)[:, None], module.prompt_encoder.get_dense_pe(), None, tokens[:, None],
      mask[:, None], "all")
  return iou[:, 0], masks[:, 0]


def decoder_fn(model: Sam, params, slots: bool = False) -> Callable:
  """Meta's ONNX decoder inputs, less orig_im_size -> (iou_predictions, low_res_masks).

  `slots`: the points come after `mask_decoder.num_output_tokens` entries whose values
  are ignored (`_decode_in_slots`), the program the ONNX export converts.
  """
  method = _decode_in_slots if slots else _decode_all
  def decode(image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
    return model.apply({"params": params}, image_embeddings, point_coords, point_labels,
                       mask_input, has_mask_input, method=method)
  return decode


def _specs(model: Sam, batch, points) -> Dict[str, Tuple[Tuple, np.dtype]]:
  """Shapes and dtypes of every input, with `batch` and `points` as given (ints or names)."""
  s = model.image_size[0]
  gh, gw = model.prompt_encoder.image_embedding_size
  c = model.prompt_encoder.embed_dim
  f32 = np.float32
  return {
      "images": ((batch, s, s, 3), f32),
      "image_embeddings": ((1, c, gh, gw), f32),
      "point_coords": ((1, points, 2), f32),
      "point_labels": ((1, points), f32),
      "mask_input": ((1, 1, 4 * gh, 4 * gw), f32),
      "has_mask_input": ((1,), f32),
      "orig_im_size": ((2,), f32),
  }


ENCODER_IO = (["images"], ["image_embeddings"])
DECODER_IO = (["image_embeddings", "point_coords", "point_labels", "mask_input",
               "has_mask_input"], ["iou_predictions", "low_res_masks"])
ONNX_DECODER_IO = (DECODER_IO[0] + ["orig_im_size"], ["masks", "iou_predictions", "low_res_masks"])


# ---------------------------------------------------------------------------- StableHLO

def export_stablehlo(model: Sam, params, directory: str, platforms: Sequence[str]) -> Dict:
  batch, points = jax.export.symbolic_shape("B, N")
  specs = {k: jax.ShapeDtypeStruct(*v) for k, v in _specs(model, batch, points).items()}
  manifest = {}
  for name, fn, (ins, outs) in (("encoder", encoder_fn(model, params), ENCODER_IO),
                                ("decoder", decoder_fn(model, params), DECODER_IO)):
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
        *[specs[i] for i in ins])
    with open(os.path.join(directory, f"{name}.stablehlo"), "wb") as f:
      f.write(exported.serialize())
    manifest[name] = dict(
        file=f"{name}.stablehlo", platforms=list(exported.platforms),
        calling_convention_version=exported.calling_convention_version,
        inputs={i: _describe(a) for i, a in zip(ins, exported.in_avals)},
        outputs={o: _describe(a) for o, a in zip(outs, exported.out_avals)})
  return manifest


def load_stablehlo(path: str) -> Callable:
  """A function running an exported program (only JAX needed, not sam_jax's model code)."""
  with open(path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read())).call


def _describe(aval) -> Dict:
  return dict(shape=[d if isinstance(d, int) else str(d) for d in aval.shape],
              dtype=str(aval.dtype))


# ---------------------------------------------------------------------------- ONNX

class _Graph:
  """Appends nodes and constants to an ONNX graph under one name prefix."""

  def __init__(self, graph, prefix: str):
    self.graph, self.prefix, self.nodes = graph, prefix, []

  def const(self, name, values, dtype):
    from onnx import helper
    name = self.prefix + name
    self.graph.initializer.append(helper.make_tensor(name, dtype, [len(values)], values))
    return name

  def __call__(self, op, inputs, output=None, **attrs):
    from onnx import helper
    output = output or f"{self.prefix}{op.lower()}_{len(self.nodes)}"
    self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
    return output


def _onnx_point_slots(graph, slots: int) -> None:
  """Meta's point inputs, of any length N, each preceded by `slots` zeros: the
  converted graph (`decoder_fn(slots=True)`) writes its output tokens there."""
  from onnx import TensorProto, helper
  g = _Graph(graph, "point_slots_")
  i64 = TensorProto.INT64
  for node in graph.node:  # the converted graph reads the slotted inputs
    for j, name in enumerate(node.input):
      if name in ("point_coords", "point_labels"):
        node.input[j] = f"{name}_slotted"
  # Pads are (begins, ends) per axis: the points axis (1) gets `slots` at its beginning.
  g("Pad", ["point_coords", g.const("coord_pads", [0, slots, 0, 0, 0, 0], i64)],
    "point_coords_slotted")
  g("Pad", ["point_labels", g.const("label_pads", [0, slots, 0, 0], i64)],
    "point_labels_slotted")
  for node in reversed(g.nodes):
    graph.node.insert(0, node)
  inputs = list(graph.input)
  del graph.input[:]
  for v in inputs:
    if v.name == "point_coords":
      v = helper.make_tensor_value_info("point_coords", TensorProto.FLOAT, [1, "N", 2])
    elif v.name == "point_labels":
      v = helper.make_tensor_value_info("point_labels", TensorProto.FLOAT, [1, "N"])
    graph.input.append(v)


def _onnx_postprocessing(graph, image_size: int) -> None:
  """Appends Meta's `mask_postprocessing`: low_res_masks -> (S, S), crop to the
  resized image, -> orig_im_size, as output `masks`."""
  from onnx import TensorProto, helper
  g = _Graph(graph, "postprocess_")
  i64, f32 = TensorProto.INT64, TensorProto.FLOAT
  linear = dict(mode="linear", coordinate_transformation_mode="half_pixel")
  lead = g("Slice", [g("Shape", ["low_res_masks"]), g.const("0", [0], i64), g.const("2", [2], i64)])
  full = g("Concat", [lead, g.const("S", [image_size, image_size], i64)], axis=0)
  up = g("Resize", ["low_res_masks", "", "", full], **linear)
  # prepadded = floor(S / max(orig) * orig + 0.5), as Meta's resize_longest_image_size.
  scale = g("Div", [g.const("Sf", [float(image_size)], f32),
                    g("ReduceMax", ["orig_im_size"], keepdims=1)])
  pre = g("Cast", [g("Floor", [g("Add", [g("Mul", [scale, "orig_im_size"]),
                                         g.const("half", [0.5], f32)])])], to=i64)
  cropped = g("Slice", [up, g.const("zeros", [0, 0], i64), pre, g.const("axes", [2, 3], i64)])
  size = g("Concat", [lead, g("Cast", ["orig_im_size"], to=i64)], axis=0)
  g("Resize", [cropped, "", "", size], "masks", **linear)
  graph.node.extend(g.nodes)
  graph.input.append(helper.make_tensor_value_info("orig_im_size", f32, [2]))
  outputs = {o.name: o for o in graph.output}
  del graph.output[:]
  graph.output.extend([helper.make_tensor_value_info("masks", f32, [1, None, "H0", "W0"]),
                       outputs["iou_predictions"], outputs["low_res_masks"]])


def _to_onnx(fn, specs, ins, outs, opset):
  import contextlib
  import io
  import jax2onnx
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its debugging
      return jax2onnx.to_onnx(fn, [specs[i] for i in ins], opset=opset, input_names=ins,
                              output_names=outs)
  except Exception as e:  # the converter raises many types for an op it lacks
    raise ExportError(f"jax2onnx could not convert the program: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _save_onnx(proto, directory: str, name: str) -> List[str]:
  import onnx
  onnx.checker.check_model(proto)
  path = os.path.join(directory, f"{name}.onnx")
  if proto.ByteSize() < _ONNX_INLINE_LIMIT:
    onnx.save(proto, path)
    return [f"{name}.onnx"]
  onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
            location=f"{name}.onnx.data")
  return [f"{name}.onnx", f"{name}.onnx.data"]


def export_onnx(model: Sam, params, directory: str, opset: int = ONNX_OPSET) -> Dict:
  try:
    import jax2onnx  # noqa: F401
    import onnx  # noqa: F401
  except ImportError as e:
    raise ExportError("ONNX export needs: pip install 'sam_jax[export]'.") from e
  # The decoder's points with their slots: T = N + slots, named, so never computed from N.
  slots = model.mask_decoder.num_output_tokens
  t, = jax.export.symbolic_shape("T", constraints=(f"T >= {slots}",))
  specs = {k: jax.ShapeDtypeStruct(shape, dtype)
           for k, (shape, dtype) in _specs(model, 1, t).items()}
  specs["images"] = _specs(model, "B", 1)["images"][0]  # a dynamic batch: the shape, named
  manifest = {}
  encoder = _to_onnx(encoder_fn(model, params), specs, *ENCODER_IO, opset)
  manifest["encoder"] = dict(files=_save_onnx(encoder, directory, "encoder"), opset=opset,
                             **_onnx_io(encoder))
  decoder = _to_onnx(decoder_fn(model, params, slots=True), specs, *DECODER_IO, opset)
  _onnx_point_slots(decoder.graph, slots)
  _onnx_postprocessing(decoder.graph, model.image_size[0])
  manifest["decoder"] = dict(files=_save_onnx(decoder, directory, "decoder"), opset=opset,
                             **_onnx_io(decoder))
  return manifest


def _onnx_io(proto) -> Dict:
  def dims(v):
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in v.type.tensor_type.shape.dim]
  init = {i.name for i in proto.graph.initializer}
  return dict(inputs={v.name: dict(shape=dims(v)) for v in proto.graph.input if v.name not in init},
              outputs={v.name: dict(shape=dims(v)) for v in proto.graph.output})


# ---------------------------------------------------------------------------- the command

def export(checkpoint: str, output: str, fmt: str, overwrite: bool = False,
           platforms: Sequence[str] = (), opset: int = ONNX_OPSET) -> Dict:
  """Writes the encoder and the decoder of `checkpoint` to `output`; returns the manifest."""
  if fmt not in FORMATS:
    raise ExportError(f"Unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
  replaceable = outputs.folder_of(FILES[fmt], f"{fmt} export")
  outputs.check_output(os.path.abspath(output), overwrite, replaceable, f"{fmt} export")
  model, params = load_sam(checkpoint)
  h, w = model.image_size
  if h != w:
    raise ExportError(f"The model's input is {h}x{w}; the export follows Meta's and needs a "
                      "square input size.")
  with outputs.atomic_output(output, overwrite, replaceable, f"{fmt} export") as tmp:
    os.makedirs(tmp)
    if fmt == "stablehlo":
      programs = export_stablehlo(model, params, tmp, platforms or (jax.default_backend(),))
    else:
      programs = export_onnx(model, params, tmp, opset)
    manifest = dict(
        format=fmt, checkpoint=os.path.abspath(checkpoint), image_size=h,
        pixel_mean=list(model.pixel_mean), pixel_std=list(model.pixel_std), **programs)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
  return manifest


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="a sam_jax checkpoint directory")
  parser.add_argument("--output", required=True, help="the directory to write")
  parser.add_argument("--format", required=True, help="stablehlo or onnx")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an output directory that an earlier export wrote")
  parser.add_argument("--platforms", default="",
                      help="StableHLO: comma-separated platforms to lower for (cpu,cuda,tpu); "
                           "default: this machine's")
  parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset")
  parser.add_argument("--max-points", help=argparse.SUPPRESS)  # gone: named in its error
  args = parser.parse_args(argv)
  if args.max_points is not None:
    parser.error("--max-points is gone: the ONNX decoder takes any number of points. "
                 "Drop the flag.")
  try:
    platforms = [p for p in args.platforms.split(",") if p]
    manifest = export(args.checkpoint, args.output, args.format, args.overwrite, platforms,
                      args.opset)
  except (ExportError, CheckpointError, OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.output}: " + ", ".join(
      f for p in ("encoder", "decoder") for f in manifest[p].get("files", [manifest[p].get("file")])))
  return 0


if __name__ == "__main__":
  sys.exit(main())
