import numpy as np

from anomret.viz import colorize, outline, overlay_panel, save_png


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


def test_panel_is_saved_as_png(tmp_path):
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    heat = np.random.default_rng(0).random((16, 16))
    panel = overlay_panel(image, heat, mask, 0.0, 1.0, caption="bottle/000")
    assert panel.shape[1] == 16 * 2 + 4 and panel.shape[0] > 16
    path = save_png(panel, tmp_path / "a" / "panel.png")
    from PIL import Image

    assert Image.open(path).size == (panel.shape[1], panel.shape[0])
