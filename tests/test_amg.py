"""`SamAutomaticMaskGenerator` and its helpers against the reference's, on a real photo.

Random weights give speckled masks whose boxes mostly span the image, so the
thresholds are lowered (to keep masks) and box NMS is loosened (to keep more
than one); NMS itself is checked against torchvision on boxes with ties.
"""

import numpy as np
import pytest
import skimage.data
import torch
from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator
from segment_anything import automatic_mask_generator as reference_generator_module
from segment_anything.utils import amg as reference_amg
from torchvision.ops import batched_nms

from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.predictor import TRACE_COUNTS
from sam_jax.utils import mask_ops
from tests.reference import AMG_TEST_SETTINGS

SETTINGS = AMG_TEST_SETTINGS


@pytest.fixture(scope="module")
def models(tiny_sam):
  ref, _, model, params = tiny_sam
  return ref, model, params


@pytest.fixture(scope="module")
def image():
  return skimage.data.chelsea()  # 300 x 451


def reference_records(ref, image, **settings):
  with torch.no_grad():
    return ReferenceGenerator(ref, **settings).generate(image)


@pytest.fixture(scope="module")
def reference_default(models, image):
  return reference_records(models[0], image, **SETTINGS)


def as_mask(segmentation):
  if isinstance(segmentation, np.ndarray):
    return segmentation
  return mask_ops.rle_to_mask(segmentation)


def assert_records_match(ours, theirs):
  """Same number of records; each reference mask matched by one of ours, alike in every field."""
  # Settings that keep no mask would prove nothing: lower the thresholds if
  # the randomised weights change.
  assert len(theirs) > 0, "the reference kept no mask with these settings"
  assert len(ours) == len(theirs)
  our_masks = np.stack([as_mask(r["segmentation"]) for r in ours]).reshape(len(ours), -1)
  free = np.ones(len(ours), bool)
  for record in theirs:
    mask = as_mask(record["segmentation"]).reshape(1, -1)
    inter = (our_masks & mask).sum(1)
    iou = np.where(free, inter / np.maximum((our_masks | mask).sum(1), 1), -1)
    j = int(np.argmax(iou))
    free[j] = False
    mine = ours[j]
    assert iou[j] >= 0.99
    assert mine["bbox"] == record["bbox"]
    assert mine["crop_box"] == record["crop_box"]
    assert abs(mine["area"] - record["area"]) <= 0.01 * record["area"]
    assert isinstance(mine["area"], int)
    np.testing.assert_allclose(mine["predicted_iou"], record["predicted_iou"], atol=1e-3)
    np.testing.assert_allclose(mine["stability_score"], record["stability_score"], atol=2e-3)
    np.testing.assert_allclose(mine["point_coords"], record["point_coords"], atol=1e-6)
  assert [type(v) for v in ours[0].values()] == [type(v) for v in theirs[0].values()]


@pytest.fixture(scope="module")
def ours_default(models, image):
  _, model, params = models
  return SamAutomaticMaskGenerator(model, params, **SETTINGS).generate(image)


def test_generate_matches_reference(ours_default, reference_default, image):
  assert_records_match(ours_default, reference_default)
  first = ours_default[0]["segmentation"]
  assert first.dtype == bool and first.shape == image.shape[:2]


@pytest.mark.parametrize("output_mode", ["uncompressed_rle", "coco_rle"])
def test_output_modes_match_reference(models, image, reference_default, output_mode):
  """The reference's RLEs of its masks, made by its own helpers as its generator makes them."""
  _, model, params = models
  records = SamAutomaticMaskGenerator(model, params, output_mode=output_mode,
                                      **SETTINGS).generate(image)
  theirs = []
  for record in reference_default:
    rle = reference_amg.mask_to_rle_pytorch(torch.as_tensor(record["segmentation"][None]))[0]
    if output_mode == "coco_rle":
      rle = reference_amg.coco_encode_rle(rle)
    theirs.append(dict(record, segmentation=rle))
  assert_records_match(records, theirs)
  for record in records:
    assert record["segmentation"]["size"] == list(image.shape[:2])
    assert isinstance(record["segmentation"]["counts"],
                      list if output_mode == "uncompressed_rle" else str)
  # Exactly equal where the masks are: the RLE of ours is the reference's RLE of ours.
  mask = mask_ops.rle_to_mask(records[0]["segmentation"])
  ref_rle = reference_amg.mask_to_rle_pytorch(torch.as_tensor(mask[None]))[0]
  if output_mode == "coco_rle":
    ref_rle = reference_amg.coco_encode_rle(ref_rle)
  assert records[0]["segmentation"] == ref_rle


def test_box_nms_drops_duplicates(models, image, ours_default):
  _, model, params = models
  loose = SamAutomaticMaskGenerator(model, params, **dict(SETTINGS, box_nms_thresh=1.0))
  assert 1 < len(ours_default) < len(loose.generate(image))


def test_min_mask_region_area_matches_reference(models, image):
  ref, model, params = models
  settings = dict(SETTINGS, min_mask_region_area=200)
  records = SamAutomaticMaskGenerator(model, params, **settings).generate(image)
  assert_records_match(records, reference_records(ref, image, **settings))


@pytest.fixture
def keep_crop_edges(monkeypatch):
  """Disables the crop-edge filter in both generators (and recompiles ours).

  Random masks touch every crop edge, so with the filter no mask of a crop
  survives and the crop NMS would have nothing to do; the filter itself is
  compared with the reference's in `test_helpers_match_reference`.
  """
  from sam_jax import automatic_mask_generator as ours
  never = lambda boxes, *args, **kwargs: boxes[..., 0] != boxes[..., 0]  # noqa: E731
  monkeypatch.setattr(reference_generator_module, "is_box_near_crop_edge", never)
  monkeypatch.setattr(mask_ops, "is_box_near_crop_edge", never)
  ours.filter_masks.clear_cache()
  yield
  ours.filter_masks.clear_cache()


@pytest.mark.slow
def test_crop_layers_match_reference(models, keep_crop_edges):
  ref, model, params = models
  image = np.ascontiguousarray(skimage.data.coffee()[::2, ::2])  # 200 x 300, faster
  settings = dict(SETTINGS, crop_n_layers=1, crop_n_points_downscale_factor=2,
                  output_mode="coco_rle")
  records = SamAutomaticMaskGenerator(model, params, **settings).generate(image)
  assert_records_match(records, reference_records(ref, image, **settings))
  assert len({tuple(r["crop_box"]) for r in records}) > 1  # masks from several crops


def test_last_batch_is_padded_not_recompiled(models, image, ours_default):
  _, model, params = models
  traces = TRACE_COUNTS["amg_decode"]  # ours_default compiled batches of 64 points
  settings = dict(SETTINGS, points_per_side=7)  # 49 points: one short batch
  records = SamAutomaticMaskGenerator(model, params, **settings).generate(image)
  assert TRACE_COUNTS["amg_decode"] == traces
  assert records  # the short batch ran


def test_nms_matches_torchvision():
  rng = np.random.default_rng(0)
  for n in (1, 7, 70, 300):
    xy = rng.integers(0, 50, (n, 2))
    boxes = np.concatenate([xy, xy + rng.integers(0, 40, (n, 2))], 1).astype(np.float32)
    boxes[n // 2:] = boxes[: n - n // 2]  # duplicates: IoU exactly 1
    scores = rng.permutation(n).astype(np.float32)  # torch's sort breaks ties at random
    for thresh in (0.3, 0.7, 0.999):
      theirs = batched_nms(torch.as_tensor(boxes), torch.as_tensor(scores), torch.zeros(n),
                           thresh).numpy()
      np.testing.assert_array_equal(mask_ops.nms(boxes, scores, thresh), theirs)
  assert len(mask_ops.nms(np.zeros((0, 4)), np.zeros(0), 0.5)) == 0
  # Equal scores: the earlier box wins, every time.
  boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 10], [40, 40, 50, 50]], np.float32)
  np.testing.assert_array_equal(mask_ops.nms(boxes, np.ones(4), 0.5), [0, 1, 3])
  np.testing.assert_array_equal(mask_ops.nms(boxes, np.ones(4), 0.2), [0, 3])


def test_helpers_match_reference():
  rng = np.random.default_rng(1)
  masks = rng.random((6, 30, 40)) > 0.97
  masks[0] = False
  masks[1] = True
  t = torch.as_tensor(masks)
  np.testing.assert_array_equal(np.asarray(mask_ops.masks_to_boxes(masks)),
                                reference_amg.batched_mask_to_box(t).numpy())
  logits = rng.normal(size=(6, 30, 40)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(mask_ops.stability_score(logits, 0.0, 0.5)),
                             reference_amg.calculate_stability_score(torch.as_tensor(logits), 0.0,
                                                                     0.5).numpy(), rtol=1e-6)
  for mask, rle in zip(masks, reference_amg.mask_to_rle_pytorch(t)):
    assert mask_ops.uncompressed_rle(mask) == rle
    assert mask_ops.mask_to_rle(mask) == reference_amg.coco_encode_rle(rle)
    np.testing.assert_array_equal(mask_ops.rle_to_mask(rle), mask)
  boxes = rng.integers(0, 300, (50, 4))
  crop, orig = [100, 50, 300, 250], [0, 0, 400, 300]
  np.testing.assert_array_equal(
      np.asarray(mask_ops.is_box_near_crop_edge(boxes, np.array(crop, np.float32),
                                           np.array(orig, np.float32))),
      reference_amg.is_box_near_crop_edge(torch.as_tensor(boxes), crop, orig).numpy())
  for size, layers, ratio in (((300, 451), 2, 512 / 1500), ((1000, 700), 3, 0.2)):
    assert mask_ops.generate_crop_boxes(size, layers, ratio) == reference_amg.generate_crop_boxes(
        size, layers, ratio)
  for grid, ref_grid in zip(mask_ops.build_all_layer_point_grids(16, 2, 2),
                            reference_amg.build_all_layer_point_grids(16, 2, 2)):
    np.testing.assert_array_equal(grid, ref_grid)


def test_defaults_are_the_reference_defaults(models):
  import inspect
  ours = inspect.signature(SamAutomaticMaskGenerator).parameters
  theirs = inspect.signature(ReferenceGenerator).parameters
  extra = ("params", "crops_per_encode", "mesh")  # ours only: batched, data-parallel encoding
  assert [n for n in ours if n not in extra] == list(theirs)
  for name, p in theirs.items():
    if name != "model":
      assert ours[name].default == p.default, name


@pytest.mark.parametrize("kwargs, match", [
    (dict(points_per_side=None), "exactly one"),
    (dict(point_grids=[np.zeros((4, 2))]), "exactly one"),
    (dict(points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1), "per crop"),
    (dict(output_mode="png"), "output_mode"),
    (dict(points_per_batch=0), "points_per_batch"),
])
def test_bad_arguments(models, kwargs, match):
  _, model, params = models
  with pytest.raises(ValueError, match=match):
    SamAutomaticMaskGenerator(model, params, **kwargs)


def test_bad_image(models):
  _, model, params = models
  with pytest.raises(ValueError, match="RGBA"):
    SamAutomaticMaskGenerator(model, params).generate(np.zeros((20, 20, 4), np.uint8))
