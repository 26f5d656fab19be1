"""The synthetic world's semantic classes, defined once.

A small nuScenes-like taxonomy (nuScenes-lidarseg's 16 classes collapsed to what the world
contains; ``pole`` kept separate as in SemanticKITTI). Ids are what ``labels`` (per pixel) and
``point_labels`` (per LiDAR return) hold:

====  ===========  ================================================  ===================
 id   name         what gets it                                      nuScenes-lidarseg
====  ===========  ================================================  ===================
 0    ignore       sky / no surface (pixels only; LiDAR never        noise / ignore
                   returns it)
 1    road         the carriageway, lane markings, parking lanes     driveable_surface
 2    sidewalk     pavements on both sides                           sidewalk
 3    terrain      grass strips, ground beyond the pavements         terrain
 4    building     building blocks (walls, windows, roofs)           manmade
 5    vegetation   tree trunks and crowns, bushes, hedges            vegetation
 6    car          cars and vans                                     car
 7    truck        box trucks                                        truck
 8    pedestrian   people walking on the pavements                   pedestrian
 9    pole         street lights, sign posts and their signs         manmade
====  ===========  ================================================  ===================
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "ignore", "road", "sidewalk", "terrain", "building", "vegetation",
    "car", "truck", "pedestrian", "pole",
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE, ROAD, SIDEWALK, TERRAIN, BUILDING, VEGETATION, CAR, TRUCK, PEDESTRIAN, POLE = range(
    NUM_CLASSES)

#: RGB colours (0-255) for figures, one per class id.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),          # ignore / sky
    (128, 64, 128),     # road
    (244, 35, 232),     # sidewalk
    (152, 251, 152),    # terrain
    (70, 70, 70),       # building
    (107, 142, 35),     # vegetation
    (0, 0, 230),        # car
    (255, 140, 0),      # truck
    (220, 20, 60),      # pedestrian
    (255, 220, 0),      # pole
)

#: Classes of things that move (their pixels' flow includes the object's own motion).
DYNAMIC_CLASSES = (CAR, TRUCK, PEDESTRIAN)


def class_table() -> list[dict]:
    """``[{"id", "name", "color"}]`` for every class (what meta.json stores)."""
    return [{"id": i, "name": n, "color": list(c)}
            for i, (n, c) in enumerate(zip(CLASS_NAMES, CLASS_COLORS))]
