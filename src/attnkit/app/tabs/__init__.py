"""The app's tabs, in page order. A tab is one module with ``TITLE``, ``ABOUT`` and ``build(ws, state)``; a
method that lands (segmentation, style, transfer) brings its tab by adding its module here."""

from attnkit.app.tabs import (
    concepts,
    edit,
    flow_edit,
    maps,
    real_image,
    segment,
    stable_flow,
    style,
    transfer,
)

TABS = [maps, edit, real_image, segment, style, transfer, concepts, stable_flow, flow_edit]
