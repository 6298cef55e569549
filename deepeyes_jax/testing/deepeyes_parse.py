"""DeepEyes' own parsing of an assistant turn, in Python: `visual_toolbox_v2.execute` at HEAD (spec 1.5 / 1.7),
literally (regex findall, json.loads(action.strip()), call["name"], call["arguments"], arguments["bbox_2d"],
maybe_resize_bbox / validate_bbox), its exceptions sorted into our error kinds. The reference the on-device
recogniser is tested against (tests/test_tools.py) and the host loop of the rollout benchmark.
"""

import json
import re


class _Toolbox:
    """visual_toolbox_v2 at HEAD: validate_bbox / maybe_resize_bbox verbatim (prints dropped)."""

    def __init__(self, width, height):
        self.width, self.height = width, height

    def validate_bbox(self, left, top, right, bottom):
        try:
            assert left < right and bottom > top, f'invalid shape for {left=}, {top=}, {right=}, {bottom=}'
            height = bottom - top
            width = right - left
            assert max(height, width) / min(height, width) <= 100, "aspect ratio error"
            assert min(height, width) > 30, f"{height=}, {width=} is too small"
            return True
        except Exception:
            return False

    def maybe_resize_bbox(self, left, top, right, bottom):
        from math import ceil, floor
        left = max(0, left)
        top = max(0, top)
        right = min(self.width, right)
        bottom = min(self.height, bottom)
        if not self.validate_bbox(left, top, right, bottom):
            return None
        height = bottom - top
        width = right - left
        if height < 28 or width < 28:  # unreachable at HEAD (min side > 30 above), kept literally
            center_x = (left + right) / 2.0
            center_y = (top + bottom) / 2.0
            ratio = 28 / min(height, width)
            new_half_height = ceil(height * ratio * 0.5)
            new_half_width = ceil(width * ratio * 0.5)
            new_left = floor(center_x - new_half_width)
            new_right = ceil(center_x + new_half_width)
            new_top = floor(center_y - new_half_height)
            new_bottom = ceil(center_y + new_half_height)
            if not self.validate_bbox(new_left, new_top, new_right, new_bottom):
                return None
            return [new_left, new_top, new_right, new_bottom]
        return [left, top, right, bottom]


def result(status, bbox=None, error=None):
    """The parse as our dict form."""
    return dict(status=status, bbox=bbox, error=error)


def reference(action_string, width, height, box_scale=None):
    """DeepEyes' execute(); returns our dict form ("rotate" for its rotate tool)."""
    answer = re.findall(r'<answer>(.*?)</answer>', action_string, re.DOTALL)
    answer = answer[-1] if answer else None
    if answer:
        return result("answer")
    action = re.findall(r'<tool_call>(.*?)</tool_call>', action_string, re.DOTALL)
    action = action[-1] if action else None
    if not action:
        return result("none")
    try:
        tool_call = json.loads(action.strip())
    except Exception:
        return result("error", error="json")
    toolbox = _Toolbox(width, height)
    try:
        tool_name = tool_call["name"]
        args = tool_call["arguments"]
        if tool_name == "image_zoom_in_tool":
            bbox = args["bbox_2d"]
            if box_scale is not None:  # our coordinate-frame option, not in DeepEyes
                bbox = [v * s for v, s in zip(bbox, (*box_scale, *box_scale), strict=True)]
            bbox = toolbox.maybe_resize_bbox(*bbox)
            if not bbox:
                raise ValueError("ZOOM IN ARGUMENTS ARE INVALID")
            return result("zoom", bbox=[float(v) for v in bbox])
        elif tool_name == "image_rotate_tool":
            angle = args["angle"]
            float(angle)  # PIL's rotate needs a number
            return result("rotate")
        else:
            raise ValueError(f"Unknown tool name: {tool_name}")
    except ValueError as e:
        if str(e) == "ZOOM IN ARGUMENTS ARE INVALID":
            return result("error", error="invalid_bbox")
        if str(e).startswith("Unknown tool name: "):
            return result("error", error="unknown_tool")
        return result("error", error="arguments")
    except Exception:  # KeyError, TypeError (not subscriptable, wrong arity, max(0, "x"), ...)
        return result("error", error="arguments")
