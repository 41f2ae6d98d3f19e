// Workflows saved while the One-Step SR node still had its (ignored) tile_overlap widget hold six
// widget values: scale, tiling, tile_size, tile_overlap, color_fix, prompt. The front-end assigns
// widget values by position, so the overlap's number would land in color_fix and the colour fix
// in prompt. Dropping that value before the node reads them keeps such workflows loading as saved.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/

app.registerExtension({
  name: "vpdsr.dropTileOverlap",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "VPDSR_OneStepSR") return;
    const configure = nodeType.prototype.configure;
    nodeType.prototype.configure = function (info) {
      const values = info?.widgets_values;
      if (Array.isArray(values) && values.length === 6 && typeof values[3] === "number") {
        values.splice(3, 1);
      }
      return configure.call(this, info);
    };
  },
});
