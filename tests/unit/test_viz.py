import numpy as np
from PIL import Image

from anomret.viz import (
    GROUND_TRUTH_COLOUR,
    PREDICTION_COLOUR,
    colorbar,
    colorize,
    outline,
    overlay_panel,
    save_png,
    upsample_map,
)


def test_colorize_uses_the_given_range_not_the_image_range():
    calm = colorize(np.full((4, 4), 0.1), vmin=0.0, vmax=1.0)
    hot = colorize(np.full((4, 4), 1.0), vmin=0.0, vmax=1.0)
    assert calm[0, 0, 2] > calm[0, 0, 0]  # low scores are blue
    assert hot[0, 0, 0] > hot[0, 0, 2]  # high scores are red
    assert colorize(np.array([[5.0]]), 0.0, 1.0).tolist() == hot[:1, :1].tolist()  # clipped


def test_outline_is_the_boundary_of_the_mask():
    mask = np.zeros((7, 7), bool)
    mask[2:5, 2:5] = True
    ring = outline(mask)
    assert ring.sum() == 8 and not ring[3, 3]
    thick = outline(mask, thickness=2)
    assert thick.sum() > ring.sum() and thick[ring].all()


def test_panel_is_saved_as_png(tmp_path):
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    heat = np.random.default_rng(0).random((16, 16))
    panel = overlay_panel(image, heat, mask, 0.0, 1.0, caption="bottle/000", show_colorbar=False)
    assert panel.shape[1] == 16 * 2 + 5 and panel.shape[0] > 16  # image, gap, heat map
    path = save_png(panel, tmp_path / "a" / "panel.png")
    assert Image.open(path).size == (panel.shape[1], panel.shape[0])
    assert [p.name for p in path.parent.iterdir()] == ["panel.png"]  # written atomically


def test_panel_is_drawn_at_the_images_own_resolution_with_the_map_upsampled_into_its_box():
    # A 90x60 image whose centre 60x40 region the 8x8 map covers; the ground truth on the map grid.
    image = np.full((60, 90, 3), 128, np.uint8)
    anomaly_map = np.zeros((8, 8), np.float32)
    anomaly_map[2:6, 2:6] = 1.0
    mask = anomaly_map > 0.5
    box = (15, 10, 75, 50)
    panel = overlay_panel(
        image, anomaly_map, mask, 0.0, 1.0, map_box=box, pixel_threshold=0.5, show_colorbar=False
    )
    gap = panel.shape[1] - 2 * 90
    plain, heat = panel[-60:, :90], panel[-60:, 90 + gap :]
    assert heat.shape[:2] == (60, 90)
    assert (plain == GROUND_TRUTH_COLOUR).all(axis=-1).any()  # outline of the mask, placed into the box
    assert not (plain[:10] == GROUND_TRUTH_COLOUR).all(axis=-1).any()  # nothing above the box
    assert (heat[:, :10] == 128).all()  # outside the box the image is left as it is
    assert (heat == PREDICTION_COLOUR).all(axis=-1).any()  # predicted outline at map >= 0.5


def test_colour_bar_runs_from_vmax_at_the_top_to_vmin_at_the_bottom():
    bar = colorbar(200, vmin=0.0, vmax=2.0, threshold=1.0, font_size=12)
    assert bar.shape[0] == 200 and bar.shape[1] > 12  # the bar and its tick labels
    top, bottom = bar[15, 2].astype(int), bar[185, 2].astype(int)
    assert top[0] > top[2] and bottom[2] > bottom[0]  # red at the top, blue at the bottom
    assert (bar == PREDICTION_COLOUR).all(axis=-1).any()  # the threshold is marked
    with_bar = overlay_panel(np.zeros((200, 100, 3), np.uint8), np.zeros((4, 4)), None, 0.0, 2.0)
    assert with_bar.shape[1] > 2 * 100 + bar.shape[1] // 2


def test_upsampled_map_keeps_its_values_range():
    small = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    large = upsample_map(small, width=40, height=30)
    assert large.shape == (30, 40) and large.min() >= 0.0 and large.max() <= 3.0
    assert large[0, 0] < large[-1, -1]
