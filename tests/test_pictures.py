"""Captions are written on the pictures a person looks at, clipped to their tile."""

import numpy as np
from PIL import Image

from clipseg_tools.pictures import captioned


def test_each_tile_gets_its_caption_below_it_clipped_to_its_width():
    tiles = [Image.new("RGB", (120, 40), "red"), Image.new("RGB", (60, 40), "blue")]
    sheet = captioned(tiles, ["a red square", "a caption far too long for a tile this narrow"])
    assert sheet.size == (180, 64)
    pixels = np.asarray(sheet)
    assert (pixels[:40, :120] == [255, 0, 0]).all() and (pixels[:40, 120:] == [0, 0, 255]).all()
    band = pixels[40:] < 128  # dark text on white
    assert band[:, :120].any() and band[:, 120:].any()  # both captions are written
    assert not band[:, 178:].any()  # the long one stops inside its tile
