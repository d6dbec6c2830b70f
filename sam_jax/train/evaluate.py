"""The SAM paper's prompt evaluation (§7.1, §7.4, appendix D), shared by training and the command.

One protocol, run through the predictor's own resize, decode and upscaling, on
images at their original size (masks are compared there):

* Points follow RITM: the first click is the mask's most interior pixel (the
  maximum of the distance transform of the mask padded with zeros, so the
  image border counts as a boundary). Each next click goes to the deeper of
  the two error regions, false negatives (a positive click) or false
  positives (a negative one), at the maximum of its distance transform; a tie
  gives a negative click, as in RITM. Each click after the first also feeds
  back the previous prediction's low-resolution logits.
* At one point the model's 3 outputs give "default" (its most confident mask)
  and "oracle" (the best of 3 against the ground truth). Later clicks use the
  single-output mode. The mIoU-vs-points curve starts at the default mask.
* NoC@t: the clicks needed to reach IoU t, `max_clicks` when never reached.
* Boxes: one single-output mask per ground-truth box (box mIoU), or per
  detector box for COCO mask AP (`mask_ap`, with pycocotools' COCOeval).

`run` evaluates a dataset of `Item`s, many masks of one image per decode
call and several images per encoder call (data-parallel on the predictor's
mesh); with several processes each takes every n-th image and the scores are
gathered, so every process returns the single-process result.
"""

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from scipy import ndimage

from sam_jax import predictor as predictor_lib
from sam_jax.modeling.prompt_encoder import BACKGROUND, FOREGROUND, PADDING

Item = Dict[str, np.ndarray]  # image (H, W, 3) uint8; masks (P, H, W) bool; boxes (P, 4) xyxy


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What is measured. The defaults are the paper's; training evaluates a shorter version."""
  points: Tuple[int, ...] = (1, 2, 3, 5, 9)  # mIoU reported after these numbers of points
  noc_thresholds: Tuple[float, ...] = (0.85, 0.9)
  max_clicks: int = 20  # NoC's cap: clicks stop here (or at max(points) once all masks pass)
  boxes: bool = True  # box mIoU from the ground-truth boxes
  mask_input: bool = True  # clicks after the first feed back the previous low-res logits
  images_per_call: int = 4  # images per encoder call (a multiple of the mesh's devices is best)

  @property
  def num_clicks(self) -> int:
    return max(max(self.points), self.max_clicks)

  def settings(self) -> Dict:
    return dataclasses.asdict(self)


# --- the click rule ----------------------------------------------------------

def _distance(region: np.ndarray) -> np.ndarray:
  """Distance to the nearest pixel outside `region`, the image border counting as outside."""
  return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


def interior_point(region: np.ndarray) -> np.ndarray:
  """(x, y) of the pixel of `region` farthest from its boundary (the first such in raster order)."""
  dist = _distance(region)
  row, col = np.unravel_index(np.argmax(dist), dist.shape)
  return np.array([col, row], np.float32)


def next_click(pred: np.ndarray, gt: np.ndarray) -> Tuple[Optional[np.ndarray], int]:
  """RITM's next click: ((x, y), label) in the deeper error region; (None, PADDING) if none."""
  fn, fp = gt & ~pred, pred & ~gt
  if not (fn.any() or fp.any()):
    return None, PADDING
  d_fn, d_fp = _distance(fn), _distance(fp)
  positive = d_fn.max() > d_fp.max()
  dist = d_fn if positive else d_fp
  row, col = np.unravel_index(np.argmax(dist), dist.shape)
  return np.array([col, row], np.float32), FOREGROUND if positive else BACKGROUND


def tight_box(mask: np.ndarray) -> np.ndarray:
  """(x0, y0, x1, y1) of the mask's pixels, x1 and y1 exclusive."""
  rows, cols = np.nonzero(mask)
  return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)


def iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """IoU over the last two axes; 1 where both are empty."""
  inter = (pred & gt).sum((-2, -1))
  union = (pred | gt).sum((-2, -1))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# --- prediction: the predictor's decode and upscaling, many prompts per image ---

def predict(predictor, coords, labels, boxes, masks, multimask: bool):
  """Per image (P_b, ...) prompts in original pixels -> per image (masks, iou, low-res logits).

  `predictor` is a `SamPredictor` with the images set; masks (P_b, M, H, W)
  are at each image's original size, logits (P_b, M, h, w) at the decoder's.
  Prompts are padded to one bucketed (B, P, N) shape; each image is upscaled to
  its own original size apart (a compilation per distinct size, not per batch).
  """
  n = len(predictor.original_sizes)
  counts = [len(next(x[b] for x in (coords, boxes, masks) if x is not None)) for b in range(n)]
  p = predictor_lib.bucket(max(counts))

  def stack(values, fill, dtype, transform=None):
    if values is None:
      return None
    out = np.full((n, p, *values[0].shape[1:]), fill, dtype)
    for b, v in enumerate(values):
      out[b, :len(v)] = v if transform is None else transform(v, predictor.original_sizes[b])
    return out

  c = stack(coords, 0.0, np.float32, predictor.transform.apply_coords)
  lab = stack(labels, PADDING, np.int32)
  box = stack(boxes, 0.0, np.float32, predictor.transform.apply_boxes)
  low_res, scores = predictor_lib.decode(
      predictor.model, predictor.prompt_params, predictor.cache, predictor.features, c, lab, box,
      stack(masks, 0.0, np.float32), multimask_output=multimask)
  scores, low_np = np.asarray(scores), np.asarray(low_res)
  out = []
  for b in range(n):
    (full,) = predictor_lib.upscale(predictor.model, low_res[b:b + 1],
                                    input_sizes=(predictor.input_sizes[b],),
                                    original_sizes=(predictor.original_sizes[b],))
    out.append((np.asarray(full)[:counts[b]], scores[b, :counts[b]], low_np[b, :counts[b]]))
  return out


def _evaluate_images(predictor, items: Sequence[Item], protocol: Protocol,
                     decode: Callable) -> List[Dict]:
  """Per image: iou_default, iou_oracle (P,), iou_points (P, max(points)), noc (P, T), iou_box."""
  predictor.set_image_batch([it["image"] for it in items])
  gts = [it["masks"] for it in items]
  first = [np.stack([interior_point(m) for m in g])[:, None] for g in gts]
  ones = [np.full((len(g), 1), FOREGROUND, np.int32) for g in gts]
  out = decode(predictor, first, ones, None, None, multimask=True)
  res = []
  for g, (masks, scores, _) in zip(gts, out):
    ious = iou(masks, g[:, None])  # (P, 3)
    best = np.argmax(scores, -1)
    res.append(dict(iou_default=ious[np.arange(len(g)), best], iou_oracle=ious.max(-1),
                    masks_1point=masks[np.arange(len(g)), best]))
  preds = [m[np.arange(len(m)), np.argmax(s, -1)] for m, s, _ in out]
  lows = [low[np.arange(len(low)), np.argmax(s, -1)] for _, s, low in out]  # (P, h, w)

  thresholds = np.asarray(protocol.noc_thresholds)
  curve = [[r["iou_default"]] for r in res]
  reached = [np.where(r["iou_default"][:, None] >= thresholds, 1, 0) for r in res]
  coords, labels = first, ones
  for k in range(2, protocol.num_clicks + 1):
    if k > max(protocol.points) and all(r.all() for r in reached):
      break
    new_c, new_l = [], []
    for g, pred in zip(gts, preds):
      cl = [next_click(pm, gm) for pm, gm in zip(pred, g)]
      new_c.append(np.stack([np.zeros(2, np.float32) if c is None else c for c, _ in cl])[:, None])
      new_l.append(np.array([lab for _, lab in cl], np.int32)[:, None])
    coords = [np.concatenate([a, b], 1) for a, b in zip(coords, new_c)]
    labels = [np.concatenate([a, b], 1) for a, b in zip(labels, new_l)]
    # Points padded to a power of two (label PADDING): few compilations for 20 clicks.
    n = predictor_lib.bucket(k, 4)
    pc = [predictor_lib._pad_axis(c, n, 1, 0.0) for c in coords]  # pylint: disable=protected-access
    pl = [predictor_lib._pad_axis(lab, n, 1, PADDING) for lab in labels]  # pylint: disable=protected-access
    out = decode(predictor, pc, pl, None, lows if protocol.mask_input else None, multimask=False)
    preds = [m[:, 0] for m, _, _ in out]
    lows = [low[:, 0] for _, _, low in out]
    for i, g in enumerate(gts):
      now = iou(preds[i], g)
      if k <= max(protocol.points):
        curve[i].append(now)
      hit = (reached[i] == 0) & (now[:, None] >= thresholds) & (k <= protocol.max_clicks)
      reached[i] = np.where(hit, k, reached[i])
  for i, r in enumerate(res):
    r["iou_points"] = np.stack(curve[i], 1)
    r["noc"] = np.where(reached[i] == 0, protocol.max_clicks, reached[i]).astype(np.float64)
  if protocol.boxes:
    boxes = [it["boxes"] for it in items]
    for r, (masks, _, _), g in zip(res, decode(predictor, None, None, boxes, None, False), gts):
      r["iou_box"] = iou(masks[:, 0], g)
  return res


# --- a dataset's scores ------------------------------------------------------

def run(predictor, dataset, protocol: Protocol = Protocol(), indices: Optional[Sequence[int]] = None,
        progress: bool = False, keep: int = 0, on_predictions: Optional[Callable] = None,
        decode: Callable = predict) -> Dict[str, np.ndarray]:
  """Per-mask scores of `dataset[i]` for i in `indices` (default all), in that order.

  `dataset` has `__len__` and `__getitem__` -> Item. With several processes,
  each evaluates every process_count-th image and all get the gathered scores.
  `on_predictions(index, item, default_1point_masks)` is called for the first
  `keep` images of this process (for pictures). `decode` stands in for
  `predict` (the tests' perfect predictor).
  """
  indices = list(range(len(dataset))) if indices is None else list(indices)
  pi, pc = jax.process_index(), jax.process_count()
  mine = indices[pi::pc]
  parts: List[Dict[str, np.ndarray]] = []
  bar = None
  if progress and pi == 0:
    from tqdm import tqdm
    bar = tqdm(total=len(mine), unit="image", desc="evaluating")
  for start in range(0, len(mine), protocol.images_per_call):
    chunk = mine[start:start + protocol.images_per_call]
    items = [dataset[i] for i in chunk]
    kept = [(i, it) for i, it in zip(chunk, items) if len(it["masks"])]
    if kept:
      for (i, it), r in zip(kept, _evaluate_images(predictor, [it for _, it in kept], protocol, decode)):
        r["image"] = np.full(len(it["masks"]), i, np.int64)
        r["mask"] = np.arange(len(it["masks"]))
        masks = r.pop("masks_1point")
        parts.append(r)
        if on_predictions is not None and keep > 0:
          keep -= 1
          on_predictions(i, it, masks)
    if bar is not None:
      bar.update(len(chunk))
  if bar is not None:
    bar.close()
  scores = _concat(parts, protocol)
  if pc > 1:
    scores = _gather(scores)
  order = {i: n for n, i in enumerate(indices)}
  rank = np.array([order[i] for i in scores["image"]], np.int64)
  return {k: v[np.lexsort((scores["mask"], rank))] for k, v in scores.items()}


def _concat(parts, protocol: Protocol) -> Dict[str, np.ndarray]:
  empty = dict(iou_default=np.zeros(0), iou_oracle=np.zeros(0), image=np.zeros(0, np.int64),
               mask=np.zeros(0, np.int64), iou_points=np.zeros((0, max(protocol.points))),
               noc=np.zeros((0, len(protocol.noc_thresholds))))
  if protocol.boxes:
    empty["iou_box"] = np.zeros(0)
  return {k: np.concatenate([v] + [p[k] for p in parts]) for k, v in empty.items()}


def _gather(scores: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Every process's scores on every process (padded to the longest, then cut)."""
  from jax.experimental import multihost_utils
  counts = multihost_utils.process_allgather(np.array([len(scores["image"])]))
  longest = int(counts.max())
  if longest == 0:
    return scores
  out = {}
  for k, v in scores.items():
    padded = np.zeros((longest, *v.shape[1:]), v.dtype)
    padded[:len(v)] = v
    # As 32-bit words: without jax_enable_x64, JAX would round 64-bit values to 32 bits.
    words = padded.reshape(longest, -1).view(np.uint32)
    every = np.asarray(multihost_utils.process_allgather(words)).view(v.dtype)
    every = every.reshape(len(every), longest, *v.shape[1:])
    out[k] = np.concatenate([every[p, :int(n)] for p, n in enumerate(counts.reshape(-1))])
  return out


def summarize(scores: Dict[str, np.ndarray], protocol: Protocol) -> Dict[str, object]:
  """The reported numbers: mIoU per number of points, default and oracle at 1, NoC, box mIoU."""
  n = len(scores["image"])
  mean = lambda x: float(np.mean(x)) if n else float("nan")  # noqa: E731
  out = dict(num_masks=n, num_images=len(np.unique(scores["image"])),
             miou_points={str(k): mean(scores["iou_points"][:, k - 1]) for k in protocol.points},
             miou_1point_default=mean(scores["iou_default"]),
             miou_1point_oracle=mean(scores["iou_oracle"]))
  for t, col in zip(protocol.noc_thresholds, scores["noc"].T):
    out[f"noc{round(t * 100)}"] = mean(col)
  if "iou_box" in scores:
    out["miou_box"] = mean(scores["iou_box"])
  return out


# --- COCO mask AP from a detector's boxes ------------------------------------

def mask_ap(predictor, dataset, coco_gt, detections: List[Dict], indices: Sequence[int],
            images_per_call: int = 4, progress: bool = False) -> Dict[str, float]:
  """COCO mask AP (COCOeval 'segm') of one mask per detector box, on the images `indices`.

  `detections` is in COCO results format (image_id, category_id, bbox xywh,
  score); `dataset.image_ids[i]` is the COCO id of `dataset[i]`.
  """
  from pycocotools import mask as mask_utils
  by_image: Dict[int, List[Dict]] = {}
  for d in detections:
    by_image.setdefault(int(d["image_id"]), []).append(d)
  ids = [dataset.image_ids[i] for i in indices]
  todo = [i for i in indices if by_image.get(dataset.image_ids[i])]
  results = []
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(todo), unit="image", desc="mask AP")
  for start in range(0, len(todo), images_per_call):
    chunk = todo[start:start + images_per_call]
    images = [dataset.image(i) for i in chunk]
    predictor.set_image_batch(images)
    boxes = []
    for i, im in zip(chunk, images):
      b = np.array([d["bbox"] for d in by_image[dataset.image_ids[i]]], np.float64).reshape(-1, 4)
      b[:, 2:] += b[:, :2]
      h, w = im.shape[:2]
      boxes.append(np.clip(b, 0, [w, h, w, h]))
    for i, (masks, _, _) in zip(chunk, predict(predictor, None, None, boxes, None, False)):
      for d, m in zip(by_image[dataset.image_ids[i]], masks[:, 0]):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(dict(image_id=int(d["image_id"]), category_id=int(d["category_id"]),
                            segmentation=rle, score=float(d["score"])))
    if bar is not None:
      bar.update(len(chunk))
  if bar is not None:
    bar.close()
  if not results:
    raise ValueError("None of the detections falls on an evaluated image: check that their "
                     "image_id values are the annotation file's image ids.")
  return coco_mask_ap(coco_gt, results, ids)


def coco_mask_ap(coco_gt, results: List[Dict], image_ids: Sequence[int]) -> Dict[str, float]:
  """COCOeval's 12 'segm' numbers (AP, AP50, ..., AR_large) on `image_ids`."""
  import contextlib
  import io
  from pycocotools.cocoeval import COCOeval
  with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress
    # Copies without any `bbox`: loadRes adds one to each, and reads results with one as boxes.
    coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if k != "bbox"} for r in results])
    ev = COCOeval(coco_gt, coco_dt, "segm")
    ev.params.imgIds = sorted(int(i) for i in image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
  return {n: float(v) for n, v in zip(names, ev.stats)}


# --- pictures ----------------------------------------------------------------

def render(path: str, images: np.ndarray, columns: Sequence, titles: Sequence[str],
           points: np.ndarray = None, valid: np.ndarray = None, max_rows: int = 4) -> None:
  """A PNG grid: a row per image; the image, then each column's masks overlaid in colour."""
  from PIL import Image, ImageDraw
  rows = min(max_rows, len(images))
  s = images.shape[1]
  palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                      [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], float)
  canvas = Image.new("RGB", ((len(columns) + 1) * s, rows * s + 14), "white")
  draw = ImageDraw.Draw(canvas)
  for c, t in enumerate(["image"] + list(titles)):
    draw.text((c * s + 2, 1), t, fill="black")
  for r in range(rows):
    img = np.clip(images[r], 0, 255).astype(np.uint8)
    canvas.paste(Image.fromarray(img), (0, r * s + 14))
    for c, masks in enumerate(columns):
      out = img.astype(float)
      for j in range(masks.shape[1]):
        if valid is None or valid[r, j]:
          m = masks[r, j]
          out[m] = 0.45 * out[m] + 0.55 * palette[j % len(palette)]
      tile = Image.fromarray(out.astype(np.uint8))
      if points is not None:
        d = ImageDraw.Draw(tile)
        for j, (x, y) in enumerate(points[r]):
          if valid is None or valid[r, j]:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill="white", outline="black")
      canvas.paste(tile, ((c + 1) * s, r * s + 14))
  canvas.save(path)


# --- training's entry --------------------------------------------------------

def training_protocol(eval_config) -> Protocol:
  """`config.eval`'s protocol: mIoU after 1 .. num_clicks points, NoC capped at num_clicks."""
  k = int(eval_config.num_clicks)
  return Protocol(points=tuple(range(1, k + 1)), max_clicks=k,
                  images_per_call=max(4, jax.local_device_count()))


def local_mesh():
  """This process's devices as a data axis (images data-parallel); None with one device."""
  devices = jax.local_devices()
  if len(devices) == 1:
    return None
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def evaluate_model(model, params, dataset, protocol: Protocol,
                   indices: Optional[Sequence[int]] = None, pictures: int = 0,
                   progress: bool = False) -> Dict[str, object]:
  """`summarize`'s numbers for a model on `dataset` (what training and `--mode=eval` report).

  With `pictures`, `pictures` holds the first images of equal size, their
  ground truth and default 1-point masks, padded to one mask count (for `render`).
  """
  from sam_jax.predictor import SamPredictor
  predictor = SamPredictor(model, params, mesh=local_mesh())
  kept = []
  scores = run(predictor, dataset, protocol, indices, progress=progress, keep=pictures,
               on_predictions=lambda i, item, masks: kept.append((item, masks)))
  res = summarize(scores, protocol)
  kept = [(it, m) for it, m in kept if it["image"].shape == kept[0][0]["image"].shape]
  if kept:
    p = max(len(it["masks"]) for it, _ in kept)
    pad = lambda m: np.concatenate([m, np.zeros((p - len(m), *m.shape[1:]), bool)])  # noqa: E731
    res["pictures"] = dict(images=np.stack([it["image"] for it, _ in kept]),
                           gt=np.stack([pad(it["masks"]) for it, _ in kept]),
                           pred=np.stack([pad(m) for _, m in kept]),
                           valid=np.stack([np.arange(p) < len(it["masks"]) for it, _ in kept]))
  return res
