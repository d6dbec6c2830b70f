"""`ResizeLongestSide` and `SamPredictor` against the reference's, on real photos."""

import numpy as np
import pytest
import skimage.data
import torch
from segment_anything import SamPredictor as ReferencePredictor
from segment_anything.utils.transforms import ResizeLongestSide as ReferenceResize

from sam_jax.predictor import TRACE_COUNTS, ImageNotSetError, SamPredictor, bucket
from sam_jax.transforms import ResizeLongestSide

IMAGE_SIZE = 256


def photos():
  """Real photos at several sizes and aspect ratios, some smaller than the model input."""
  return {
      "chelsea_landscape": skimage.data.chelsea(),  # 300 x 451
      "coffee_portrait": np.ascontiguousarray(np.rot90(skimage.data.coffee())),  # 600 x 400
      "astronaut_small": skimage.data.astronaut()[::3, ::2],  # 171 x 256, upscaled
  }


@pytest.fixture(scope="module")
def models(tiny_sam):
  """A small randomised reference and its conversion (shared: compiling is the cost)."""
  ref, _, model, params = tiny_sam
  assert model.image_size == (IMAGE_SIZE, IMAGE_SIZE)
  return ref, model, params


@pytest.fixture(scope="module")
def predictors(models):
  ref, model, params = models
  return ReferencePredictor(ref), SamPredictor(model, params)


def assert_outputs_match(ours, theirs):
  masks, iou, low_res = ours
  ref_masks, ref_iou, ref_low_res = theirs
  assert masks.shape == ref_masks.shape and masks.dtype == ref_masks.dtype == bool
  assert iou.shape == ref_iou.shape and low_res.shape == ref_low_res.shape
  np.testing.assert_allclose(low_res, ref_low_res, atol=1e-3, rtol=0)
  np.testing.assert_allclose(iou, ref_iou, atol=1e-3, rtol=0)
  assert np.mean(masks == ref_masks) >= 0.9999
  assert 0 < masks.sum() < masks.size  # a comparison of empty masks would prove nothing


@pytest.mark.parametrize("name", list(photos()))
@pytest.mark.parametrize("target", [64, 256, 333, 1024])
def test_resize_matches_reference(name, target):
  image = photos()[name]
  ours, theirs = ResizeLongestSide(target), ReferenceResize(target)
  np.testing.assert_array_equal(ours.apply_image(image), theirs.apply_image(image))
  coords = np.random.default_rng(0).uniform(0, 300, (5, 2))
  np.testing.assert_array_equal(ours.apply_coords(coords, image.shape[:2]),
                                theirs.apply_coords(coords, image.shape[:2]))
  boxes = np.random.default_rng(1).uniform(0, 300, (3, 4))
  np.testing.assert_array_equal(ours.apply_boxes(boxes, image.shape[:2]),
                                theirs.apply_boxes(boxes, image.shape[:2]))


def test_resize_fits_non_square_inputs():
  """An (H, W) target: the image is scaled to touch one side and fit inside the other."""
  for old, target in (((300, 451), (512, 1024)), ((600, 400), (512, 1024)),
                      ((100, 900), (768, 1024))):
    h, w = ResizeLongestSide.get_preprocess_shape(*old, target)
    assert h <= target[0] and w <= target[1] and (h == target[0] or w == target[1])
    assert abs(h / w - old[0] / old[1]) < 0.02


@pytest.mark.parametrize("name", list(photos()))
def test_predict_matches_reference(predictors, name):
  ref, ours = predictors
  image = photos()[name]
  h, w = image.shape[:2]
  ref.set_image(image)
  ours.set_image(image)
  assert ours.original_size == ref.original_size == (h, w)
  assert ours.input_size == ref.input_size
  np.testing.assert_allclose(np.asarray(ours.get_image_embedding()),
                             ref.get_image_embedding().permute(0, 2, 3, 1).numpy(), atol=1e-3)
  points = np.array([[0.3 * w, 0.4 * h], [0.7 * w, 0.6 * h], [0.5 * w, 0.2 * h]])
  labels = np.array([1, 0, 1])
  box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h])
  with torch.no_grad():
    first = ref.predict(points[:1], labels[:1])
  mask_input = first[2][np.argmax(first[1])][None]
  prompts = [
      dict(point_coords=points, point_labels=labels),
      dict(box=box, multimask_output=False),
      dict(point_coords=points[:2], point_labels=labels[:2], box=box, mask_input=mask_input,
           multimask_output=False),
      dict(point_coords=points[:1], point_labels=labels[:1], mask_input=mask_input),
      dict(mask_input=mask_input),  # no sparse prompt at all: zero tokens
  ]
  for kwargs in prompts:
    with torch.no_grad():
      theirs = ref.predict(**kwargs)
    assert_outputs_match(ours.predict(**kwargs), theirs)


@pytest.fixture
def chelsea_set(predictors):
  ref, ours = predictors
  image = skimage.data.chelsea()
  ref.set_image(image)
  ours.set_image(image)
  return image


def test_predict_logits_and_bgr(predictors, chelsea_set):
  ref, ours = predictors
  box = np.array([50, 40, 300, 280])
  with torch.no_grad():
    ref_logits = ref.predict(box=box, return_logits=True, multimask_output=False)[0]
  logits = ours.predict(box=box, return_logits=True, multimask_output=False)[0]
  assert logits.dtype == np.float32
  np.testing.assert_allclose(logits, ref_logits, atol=1e-3)
  rgb = ours.predict(box=box, multimask_output=False)
  ours.set_image(chelsea_set[..., ::-1], image_format="BGR")
  for a, b in zip(rgb, ours.predict(box=box, multimask_output=False)):
    np.testing.assert_array_equal(a, b)


def test_point_counts_share_one_compilation(predictors, chelsea_set):
  _, ours = predictors
  rng = np.random.default_rng(0)
  ours.predict(rng.uniform(0, 300, (1, 2)), np.ones(1))  # compiles the 4-point bucket
  traces = TRACE_COUNTS["decode"]
  for n in (1, 2, 3, 4):
    masks, _, _ = ours.predict(rng.uniform(0, 300, (n, 2)), rng.integers(0, 2, n))
    assert masks.shape == (3, 300, 451)
  assert TRACE_COUNTS["decode"] == traces
  ours.predict(rng.uniform(0, 300, (5, 2)), np.ones(5))  # the 8-point bucket
  assert TRACE_COUNTS["decode"] == traces + 1
  assert [bucket(n, 4) for n in (1, 4, 5, 9)] == [4, 4, 8, 16]
  # Another image size compiles the upscaling again, not the decoder nor the
  # image cache (embeddings always have the padded input's size).
  caches = TRACE_COUNTS["cache"]
  assert caches >= 1  # set_image made one
  ours.set_image(np.ascontiguousarray(chelsea_set[:200, :120]))
  upscales = TRACE_COUNTS["upscale"]
  assert ours.predict(np.array([[10, 10]]), np.ones(1))[0].shape == (3, 200, 120)
  assert TRACE_COUNTS["cache"] == caches
  assert TRACE_COUNTS["decode"] == traces + 1
  assert TRACE_COUNTS["upscale"] == upscales + 1


def test_padding_does_not_change_masks(predictors, chelsea_set):
  """Three points (padded to four) against the reference, which pads nothing."""
  ref, ours = predictors
  points, labels = np.array([[100, 100], [200, 150], [400, 250]]), np.array([1, 1, 0])
  with torch.no_grad():
    theirs = ref.predict(points, labels, multimask_output=False)
  assert_outputs_match(ours.predict(points, labels, multimask_output=False), theirs)


def test_predict_batch_of_boxes_matches_reference(predictors, chelsea_set):
  ref, ours = predictors
  boxes = np.array([[10, 20, 200, 250], [150, 30, 440, 290], [60, 60, 120, 100]])
  masks, iou, low_res = ours.predict_batch(boxes=boxes, multimask_output=False)
  assert masks.shape == (3, 1, 300, 451) and iou.shape == (3, 1) and low_res.shape[:2] == (3, 1)
  with torch.no_grad():
    theirs = ref.predict_torch(
        None, None, torch.as_tensor(ref.transform.apply_boxes(boxes, ref.original_size)),
        multimask_output=False)
  for i in range(3):
    assert_outputs_match((masks[i], iou[i], low_res[i]),
                         tuple(t[i].numpy() for t in theirs))


def test_predict_batch_of_point_sets_equals_one_by_one(predictors, chelsea_set):
  _, ours = predictors
  coords = np.array([[[100, 100], [50, 60]], [[300, 200], [400, 100]]], float)
  labels = np.array([[1, 0], [1, 1]])
  masks, iou, low_res = ours.predict_batch(coords, labels)
  assert masks.shape == (2, 3, 300, 451)
  for i in range(2):
    one = ours.predict(coords[i], labels[i])
    np.testing.assert_allclose(low_res[i], one[2], atol=1e-4)
    np.testing.assert_allclose(iou[i], one[1], atol=1e-5)
    assert np.mean(masks[i] == one[0]) >= 0.9999


@pytest.mark.slow
def test_set_image_batch_matches_single_images(models):
  ref_model, model, params = models
  images = [skimage.data.chelsea(), np.ascontiguousarray(skimage.data.astronaut()[::2, ::3])]
  boxes = [np.array([[50, 40, 300, 280]]), np.array([[20, 30, 150, 200], [0, 0, 100, 100]])]
  ours = SamPredictor(model, params)
  ours.set_image_batch(images)
  assert ours.original_sizes == [(300, 451), (256, 171)]
  assert ours.get_image_embedding().shape[0] == 2
  masks, iou, low_res = ours.predict_batch(boxes=boxes, multimask_output=False)
  assert [m.shape for m in masks] == [(1, 1, 300, 451), (2, 1, 256, 171)]
  ref = ReferencePredictor(ref_model)
  for image, image_boxes, m, q, lr in zip(images, boxes, masks, iou, low_res):
    ref.set_image(image)
    for i, box in enumerate(image_boxes):
      with torch.no_grad():
        theirs = ref.predict(box=box, multimask_output=False)
      assert_outputs_match((m[i], q[i], lr[i]), theirs)
  with pytest.raises(ValueError, match="Several images"):
    ours.predict(box=boxes[0][0])
  with pytest.raises(ValueError, match="one entry per image"):
    ours.predict_batch(boxes=boxes[:1])


def test_reset_and_predict_before_set_image(models):
  _, model, params = models
  predictor = SamPredictor(model, params)
  assert not predictor.is_image_set and predictor.original_size is None
  with pytest.raises(ValueError, match="set_image"):
    predictor.predict(box=np.array([0, 0, 10, 10]))
  with pytest.raises(RuntimeError):  # what the reference raises, too
    predictor.get_image_embedding()
  assert issubclass(ImageNotSetError, ValueError)


@pytest.mark.parametrize("image, match", [
    (np.zeros((40, 50), np.uint8), "grayscale.*convert"),
    (np.zeros((40, 50, 1), np.uint8), "grayscale"),
    (np.zeros((40, 50, 4), np.uint8), "RGBA.*image\\[..., :3\\]"),
    (np.zeros((40, 50, 2), np.uint8), "shape \\(H, W, 3\\)"),
    (np.zeros((40, 50, 3), np.float32), "uint8.*float32"),
    (np.zeros((0, 50, 3), np.uint8), "empty"),
    ([[1, 2, 3]], "NumPy array"),
])
def test_bad_images(models, image, match):
  _, model, params = models
  with pytest.raises(ValueError, match=match):
    SamPredictor(model, params).set_image(image)


def test_bad_image_format(models):
  _, model, params = models
  with pytest.raises(ValueError, match="image_format"):
    SamPredictor(model, params).set_image(np.zeros((8, 8, 3), np.uint8), image_format="HSV")


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "No prompt"),
    (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "empty"),
    (dict(point_coords=np.array([[10, 10]])), "go together"),
    (dict(point_coords=np.array([[500, 10]]), point_labels=np.array([1])), "outside"),
    (dict(point_coords=np.array([[10, -1]]), point_labels=np.array([1])), "outside"),
    (dict(point_coords=np.array([[10, 10]]), point_labels=np.array([2])), "-1.*\\[2\\]"),
    (dict(point_coords=np.array([[10, 10]]), point_labels=np.array([1, 1])), "point_labels"),
    (dict(point_coords=np.array([10, 10]), point_labels=np.array([1])), "\\(N, 2\\)"),
    (dict(point_coords=np.array([[np.nan, 10]]), point_labels=np.array([1])), "finite"),
    (dict(box=np.array([10, 10, 5, 20])), "x0 <= x1"),
    (dict(box=np.array([10, 10, 500, 20])), "outside"),
    (dict(box=np.array([10, 10, 20])), "x0, y0, x1, y1"),
    (dict(mask_input=np.zeros((1, 32, 32))), "mask_input.*\\(1, 64, 64\\)"),
])
def test_bad_prompts(predictors, chelsea_set, kwargs, match):
  _, ours = predictors
  with pytest.raises(ValueError, match=match):
    ours.predict(**kwargs)
