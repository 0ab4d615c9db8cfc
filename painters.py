"""The synthetic set's damage painters: each draws one of ARTeFACT's 15 damage classes into a float image and
its id into the mask (PAINTERS: class id -> painter)."""
import numpy as np

from canvas import blob, composite, jitter, noise, paint, point_in, stroke_width, strokes


def _material_loss(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    ground = jitter(rng, (0.93, 0.9, 0.82), 0.03)
    # Where the lost layer was itself pale (paper, parchment), the hole shows the darker mount behind it.
    backing = jitter(rng, (0.5, 0.46, 0.42), 0.04)
    grain = noise(rng, size, size // 4)[..., None] * 0.04
    for _ in range(rng.integers(1, 4)):
        cy, cx = point_in(rng, ctx["box"], 0.05)
        field = blob(rng, (yy, xx), (cy, cx), rng.uniform(0.07, 0.19) * size, 0.3)
        inside = field < 1.0
        colour = backing if img[inside].mean() > 0.75 else ground
        img[inside] = (colour - grain)[inside]
        # A torn edge: the surrounding layer breaks off with a thin dark lip.
        lip = inside & (field > 0.9)
        img[lip] *= 0.6
        mask[inside] = 1


def _peel(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    ground = jitter(rng, (0.72, 0.66, 0.55), 0.05)
    cy, cx = point_in(rng, ctx["box"])
    spread = rng.uniform(0.07, 0.15) * size
    for _ in range(rng.integers(8, 18)):
        fy, fx = cy + rng.normal(0, spread), cx + rng.normal(0, spread)
        field = blob(rng, (yy, xx), (fy, fx), rng.uniform(0.035, 0.08) * size, 0.45, 12)
        inside = field < 1.0
        lifted = 0.45 * img + 0.55 * ground + 0.08
        img[inside] = np.clip(lifted[inside], 0, 1)
        # Lifted flakes catch light on one side and cast a shadow on the other.
        rim = inside & (field > 0.75)
        lit = (yy - fy) + (xx - fx) < -0.015 * size
        img[rim & lit] = img[rim & lit] * 0.7 + 0.3
        img[rim & ~lit] *= 0.35
        mask[inside] = 2


def _dust(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    y0, x0, y1, x1 = ctx["box"]
    light = jitter(rng, (0.9, 0.89, 0.86), 0.03)
    dark = jitter(rng, (0.22, 0.21, 0.2), 0.03)
    # Dust is seen where it contrasts: pale specks on dark passages, grey specks on pale ones.
    colour = np.where((img.mean(-1) < 0.55)[..., None], light, dark)
    cy, cx = point_in(rng, ctx["box"], 0.0)
    spread = rng.uniform(0.15, 0.5) * size

    def specks(draw, s):
        n = rng.integers(40, 140)
        py, px = cy + rng.normal(0, spread, n), cx + rng.normal(0, spread, n)
        radii = np.maximum(0.6, rng.uniform(0.5, 1.3, n) * u) * s
        keep = (py > y0) & (py < y1) & (px > x0) & (px < x1)
        for y, x, r in zip(py[keep] * s, px[keep] * s, radii[keep]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)

    paint(img, mask, 0.9 * strokes(size, specks), colour, 3)


def _scratch(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    # A scratch exposes a bright layer; on an already pale surface the groove reads as a grey line instead.
    colour = np.where((img.mean(-1) < 0.7)[..., None], jitter(rng, (0.92, 0.91, 0.88), 0.03), img * 0.55)
    direction = rng.uniform(0, np.pi)

    def lines(draw, s):
        for _ in range(rng.integers(2, 7)):
            cy, cx = point_in(rng, ctx["box"], 0.1)
            angle = direction + rng.normal(0, 0.12)
            half = rng.uniform(0.1, 0.35) * size
            bend = rng.normal(0, 0.012) * size
            t = np.linspace(-1, 1, 12)
            px = cx + t * half * np.cos(angle) - (1 - t ** 2) * bend * np.sin(angle)
            py = cy + t * half * np.sin(angle) + (1 - t ** 2) * bend * np.cos(angle)
            width = stroke_width(rng.uniform(0.8, 1.6) * u, s)
            draw.line(list(zip(px * s, py * s)), fill=255, width=width)

    paint(img, mask, 0.95 * strokes(size, lines), colour, 4)


def _hair(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    colour = jitter(rng, (0.08, 0.06, 0.05), 0.03)

    def curves(draw, s):
        for _ in range(rng.integers(1, 4)):
            cy, cx = point_in(rng, ctx["box"], 0.1)
            steps = int(rng.uniform(0.3, 0.7) * size / (1.5 * u))
            turn = np.cumsum(rng.normal(0, 0.12, steps)) + rng.uniform(0, 2 * np.pi)
            py = cy + np.cumsum(np.sin(turn)) * 1.5 * u
            px = cx + np.cumsum(np.cos(turn)) * 1.5 * u
            draw.line(list(zip(px * s, py * s)), fill=255, width=stroke_width(0.9 * u, s), joint="curve")

    paint(img, mask, 0.95 * strokes(size, curves), colour, 5)


def _dirt(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    cy, cx = point_in(rng, ctx["box"])
    field = blob(rng, (yy, xx), (cy, cx), rng.uniform(0.08, 0.18) * size, 0.35)
    field = field + 0.5 * (noise(rng, size, 8, 2) - 0.5)
    inside = field < 1.0
    grain = noise(rng, size, size // 2)
    darkening = rng.uniform(0.5, 0.75) + 0.5 * (grain - 0.5)
    tint = jitter(rng, (0.35, 0.34, 0.32), 0.03)
    dirty = img * darkening[..., None] * 0.7 + tint * darkening[..., None] * 0.3
    img[inside] = dirty[inside]
    mask[inside] = 6


def _fold(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    cy, cx = point_in(rng, ctx["box"], 0.2)
    angle = rng.uniform(0, np.pi)
    across = (xx - cx) * -np.sin(angle) + (yy - cy) * np.cos(angle)
    half = rng.uniform(0.02, 0.045) * size
    t = across / half
    band = np.abs(t) < 1.0
    shade = 1.0 + rng.choice((-1, 1)) * 0.4 * np.clip(t, -1, 1) - 0.45 * np.exp(-(t * 4) ** 2)
    img *= np.where(band, shade, 1.0)[..., None]
    img[band] += 0.05
    # Paint wears off along the crease in small pale flecks.
    worn = (np.abs(t) < 0.45) & (noise(rng, size, size // 3) > rng.uniform(0.5, 0.65))
    img[worn] = img[worn] * 0.4 + 0.55
    np.clip(img, 0, 1, out=img)
    mask[band] = 7


def _cursive_line(rng, x0, y0, length, height):
    """Polylines (one per word) of a handwritten line: a smooth curve through per-letter up/down strokes."""
    xs, ys, word = [], [], []
    x, w = x0, 0
    while x < x0 + length:
        pitch = height * rng.uniform(0.4, 0.9)
        tall = rng.uniform(0.35, 0.8) * (1.9 if rng.random() < 0.2 else 1.0)
        kind = rng.integers(3)
        if kind == 0:
            fx, fy = (0.1, 0.5, 0.9), (0.0, tall, 0.1)
        elif kind == 1:
            fx, fy = (0.1, 0.7, 0.2, 0.9), (0.0, tall, 0.5 * tall, 0.05)
        else:
            fx, fy = (0.1, 0.35, 0.6, 0.9), (0.0, tall, 0.1, 0.6 * tall)
        xs += [x + f * pitch for f in fx]
        ys += [y0 - f * height for f in fy]
        word += [w] * len(fx)
        x += pitch
        if rng.random() < 0.2:
            x += 0.6 * height
            w += 1
    xs, ys, word = np.array(xs), np.array(ys), np.array(word)
    xs -= 0.35 * (y0 - ys) * rng.uniform(0.3, 1.0)
    words = []
    for w in np.unique(word):
        px, py = xs[word == w], ys[word == w]
        if len(px) < 3:
            continue
        # Catmull-Rom through the control points, so strokes come out round rather than zigzag.
        p = np.stack([np.r_[px[0], px, px[-1]], np.r_[py[0], py, py[-1]]], 1)
        t = np.linspace(0, 1, 6)[:-1, None, None]
        p0, p1, p2, p3 = p[:-3], p[1:-2], p[2:-1], p[3:]
        curve = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                       + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3)
        words.append(np.concatenate([curve.transpose(1, 0, 2).reshape(-1, 2), p[-2:-1]]))
    return words


def _writing(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    # Ballpoint blue, faded iron-gall brown, pencil grey.
    inks = ((0.12, 0.16, 0.5), (0.38, 0.22, 0.1), (0.3, 0.3, 0.33))
    colour = jitter(rng, inks[rng.integers(3)], 0.03)
    y0, x0, y1, x1 = ctx["box"]
    height = rng.uniform(4, 8) * u
    left = rng.uniform(x0, x0 + 0.5 * (x1 - x0))
    top = rng.uniform(y0 + 2 * height, y0 + 0.7 * (y1 - y0))
    width = rng.uniform(0.25, 0.5) * (x1 - x0)

    def lines(draw, s):
        for k in range(rng.integers(1, 4)):
            for word in _cursive_line(rng, left, top + k * 2.2 * height, width, height):
                if len(word) > 1:
                    draw.line([tuple(p) for p in word * s], fill=255,
                              width=stroke_width(1.1 * u, s), joint="curve")

    paint(img, mask, 0.95 * strokes(size, lines), colour, 8)


def _cracks(rng, img, mask, ctx):
    yy, xx, size, u = ctx["yy"], ctx["xx"], ctx["size"], ctx["size"] / 128
    colour = jitter(rng, (0.06, 0.05, 0.05), 0.02)
    cy, cx = point_in(rng, ctx["box"])
    if rng.random() < 0.5:
        radius = rng.uniform(0.12, 0.25) * size
        ys = slice(max(0, int(cy - radius)), min(size, int(cy + radius) + 1))
        xs = slice(max(0, int(cx - radius)), min(size, int(cx + radius) + 1))
        warp = (noise(rng, size, 6) - 0.5)[ys, xs] * 6 * u
        sy, sx = yy[ys, xs] + warp, xx[ys, xs] - warp
        cells = int(rng.integers(10, 30))
        py = cy + rng.uniform(-radius, radius, cells)
        px = cx + rng.uniform(-radius, radius, cells)
        # Craquelure: the edges of a warped Voronoi tiling, i.e. pixels near the bisector of their two nearest seeds.
        dist2 = (sy[..., None] - py) ** 2 + (sx[..., None] - px) ** 2
        two = np.argpartition(dist2, 1, axis=-1)[..., :2]
        d1, d2 = np.take_along_axis(dist2, two, -1).transpose(2, 0, 1)
        gap = np.maximum(np.hypot(py[two[..., 0]] - py[two[..., 1]], px[two[..., 0]] - px[two[..., 1]]), 1e-3)
        to_edge = np.abs(d2 - d1) / (2 * gap)
        region = blob(rng, (yy[ys, xs], xx[ys, xs]), (cy, cx), radius, 0.3)
        alpha = np.zeros((size, size), np.float32)
        alpha[ys, xs] = np.clip(1.2 - to_edge / (0.6 * max(u, 1.0)), 0, 1) * (region < 1.0)
    else:
        def branches(draw, s):
            stack = [(cy, cx, rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.4) * size)]
            drawn = 0
            while stack and drawn < 12:
                y, x, angle, length = stack.pop()
                steps = max(2, int(length / (2 * u)))
                turn = angle + np.cumsum(rng.normal(0, 0.25, steps))
                py = y + np.cumsum(np.sin(turn)) * 2 * u
                px = x + np.cumsum(np.cos(turn)) * 2 * u
                draw.line([(x * s, y * s)] + list(zip(px * s, py * s)), fill=255,
                          width=stroke_width((1.5 if drawn == 0 else 0.9) * u, s))
                drawn += 1
                for k in rng.choice(steps, size=min(steps, 2), replace=False):
                    if rng.random() < 0.6 and length > 6 * u:
                        side = rng.choice((-1, 1)) * rng.uniform(0.4, 1.0)
                        stack.append((py[k], px[k], turn[k] + side, length * rng.uniform(0.3, 0.6)))

        alpha = strokes(size, branches)
    paint(img, mask, 0.95 * alpha, colour, 9)


def _staining(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    cy, cx = point_in(rng, ctx["box"], 0.05)
    field = blob(rng, (yy, xx), (cy, cx), rng.uniform(0.12, 0.25) * size, 0.3)
    field = field + 0.3 * (noise(rng, size, 5) - 0.5)
    opacity = rng.uniform(0.55, 0.85)
    alpha = np.clip((1.15 - field) / 0.5, 0, 1) * opacity
    tide = np.exp(-((field - 0.97) / 0.05) ** 2) * 0.25
    colour = jitter(rng, (0.72, 0.48, 0.14), 0.04)
    tint = 1.0 - alpha[..., None] * (1.0 - colour) - tide[..., None] * 0.5
    img *= tint
    mask[field < 1.0] = 10


def _stamp(rng, img, mask, ctx):
    yy, xx, size, u = ctx["yy"], ctx["xx"], ctx["size"], ctx["size"] / 128
    inks = ((0.8, 0.08, 0.12), (0.12, 0.2, 0.7), (0.5, 0.12, 0.6))
    colour = jitter(rng, inks[rng.integers(3)], 0.04)
    cy, cx = point_in(rng, ctx["box"])
    r = rng.uniform(0.07, 0.12) * size
    round_stamp = rng.random() < 0.6
    aspect = rng.uniform(0.6, 0.9)

    def shape(draw, s):
        box = (cx - r, cy - r, cx + r, cy + r) if round_stamp else (cx - r, cy - r * aspect, cx + r, cy + r * aspect)
        inner = 0.72
        w = stroke_width(1.6 * u, s)
        big = tuple(v * s for v in box)
        small = tuple(s * (c + inner * (v - c)) for v, c in zip(box, (cx, cy, cx, cy)))
        if round_stamp:
            draw.ellipse(big, outline=255, width=w)
            draw.ellipse(small, outline=255, width=max(1, w // 2))
            for a in np.linspace(0, 2 * np.pi, rng.integers(8, 16), endpoint=False):
                rr = (0.86 * r) * s
                draw.line((cx * s + rr * np.cos(a), cy * s + rr * np.sin(a),
                           cx * s + rr * np.cos(a + 0.15), cy * s + rr * np.sin(a + 0.15)), fill=255, width=w // 2 + 1)
        else:
            draw.rectangle(big, outline=255, width=w)
            draw.rectangle(small, outline=255, width=max(1, w // 2))
        for k in range(rng.integers(1, 4)):
            y = cy + (k - 1) * 0.22 * r
            draw.line(((cx - 0.45 * r) * s, y * s, (cx + rng.uniform(0, 0.45) * r) * s, y * s), fill=255, width=w)

    texture = np.clip(0.3 + noise(rng, size, size // 8, 2) * 1.2, 0, 1)
    alpha = strokes(size, shape) * texture * rng.uniform(0.8, 1.0)
    if round_stamp:
        region = np.hypot(yy - cy, xx - cx) < r
    else:
        region = (np.abs(yy - cy) < r * aspect) & (np.abs(xx - cx) < r)
    # Ink smudges faintly across the whole pad area, not only along the engraved lines.
    alpha = np.maximum(alpha, region * texture * rng.uniform(0.2, 0.35))
    composite(img, alpha, colour)
    mask[region] = 11


def _sticker(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    papers = ((0.96, 0.96, 0.94), (0.75, 0.85, 0.95), (0.8, 0.93, 0.78), (0.95, 0.78, 0.82), (0.72, 0.58, 0.42))
    colour = jitter(rng, papers[rng.integers(len(papers))], 0.02)
    cy, cx = point_in(rng, ctx["box"])
    h, w = rng.uniform(0.05, 0.12) * size, rng.uniform(0.08, 0.18) * size
    angle = rng.normal(0, 0.15)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) @ rot.T + (cx, cy)

    def rect(draw, s):
        draw.polygon([tuple(p) for p in corners * s], fill=255)

    def shadow(draw, s):
        draw.polygon([tuple(p) for p in (corners + 0.8 * u) * s], fill=255)

    img *= 1.0 - 0.35 * strokes(size, shadow)[..., None]
    coverage = strokes(size, rect)
    paint(img, mask, coverage, colour, 12, threshold=0.5)
    text = jitter(rng, (0.2, 0.2, 0.22), 0.03)

    def printed(draw, s):
        for k in range(rng.integers(0, 4)):
            y = -0.5 * h + k * 0.3 * h
            a = np.array([-0.7 * w, y]) @ rot.T + (cx, cy)
            b = np.array([rng.uniform(-0.3, 0.7) * w, y]) @ rot.T + (cx, cy)
            draw.line((a[0] * s, a[1] * s, b[0] * s, b[1] * s), fill=255, width=stroke_width(u, s))

    composite(img, 0.8 * strokes(size, printed) * coverage, text)


def _puncture(rng, img, mask, ctx):
    size, u = ctx["size"], ctx["size"] / 128
    hole = jitter(rng, (0.05, 0.04, 0.04), 0.02)
    rim = jitter(rng, (0.62, 0.52, 0.4), 0.05)
    cy, cx = point_in(rng, ctx["box"])
    points = [(cy + rng.normal(0, 0.12 * size), cx + rng.normal(0, 0.12 * size), rng.uniform(1.5, 3.5) * u)
              for _ in range(rng.integers(1, 7))]

    def rims(draw, s):
        for y, x, r in points:
            rr = (r + 1.2 * u) * s
            draw.ellipse((x * s - rr, y * s - rr, x * s + rr, y * s + rr), fill=255)

    def holes(draw, s):
        for y, x, r in points:
            draw.ellipse(((x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s), fill=255)

    paint(img, mask, strokes(size, rims), rim, 13)
    paint(img, mask, strokes(size, holes), hole, 13)


def _burn(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    cy, cx = point_in(rng, ctx["box"], 0.05)
    field = blob(rng, (yy, xx), (cy, cx), rng.uniform(0.06, 0.14) * size, 0.4, 8)
    field = field + 0.4 * (noise(rng, size, 10, 2) - 0.5)
    grain = noise(rng, size, size // 3)
    char = np.clip(0.05 + 0.12 * grain, 0, 1)[..., None] * np.asarray((1.0, 0.8, 0.6), np.float32)
    scorch = jitter(rng, (0.38, 0.22, 0.1), 0.03)
    core = np.clip((0.75 - field) / 0.25, 0, 1)[..., None]
    halo = np.clip((1.3 - field) / 0.55, 0, 1)[..., None]
    img[:] = img * (1 - halo) + scorch * halo
    img[:] = img * (1 - core) + char * core
    mask[field < 1.0] = 14


def _lightleak(rng, img, mask, ctx):
    yy, xx, size = ctx["yy"], ctx["xx"], ctx["size"]
    y0, x0, y1, x1 = ctx["box"]
    edge = rng.integers(4)
    depth = (yy - y0, y1 - yy, xx - x0, x1 - xx)[edge] / size
    along = (xx, xx, yy, yy)[edge] / size
    scale = rng.uniform(0.05, 0.14) * (0.7 + 0.6 * np.exp(-((along - rng.uniform(0, 1)) / 0.35) ** 2))
    alpha = np.clip(rng.uniform(0.85, 1.1) * np.exp(-depth / scale), 0, 1)
    warm = np.stack([np.ones_like(alpha), 0.45 + 0.5 * (1 - alpha), 0.08 + 0.25 * (1 - alpha)], -1)
    img[:] = 1.0 - (1.0 - img) * (1.0 - alpha[..., None] * warm)
    img[:] = img * (1 - 0.5 * alpha[..., None]) + 0.5 * alpha[..., None] * warm
    mask[alpha >= 0.35] = 15


PAINTERS = {1: _material_loss, 2: _peel, 3: _dust, 4: _scratch, 5: _hair, 6: _dirt, 7: _fold,
             8: _writing, 9: _cracks, 10: _staining, 11: _stamp, 12: _sticker, 13: _puncture,
             14: _burn, 15: _lightleak}
