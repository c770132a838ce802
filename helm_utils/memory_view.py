"""The memory as text and pictures: each step's frame over a strip with the step, action, reward, value, the
words entering the memory and the step the Transformer-XL attends to most; written as one mp4 per episode."""

from pathlib import Path

import numpy as np

from helm_utils import files


class Output:
    def step(self, record):
        pass

    def end_episode(self, episode):
        pass

    def close(self):
        pass


def strip_lines(algorithm, record, attention_layer):
    """The memory strip's text: step, action, reward, value; the memory's words; its attention."""
    lines = [
        f"episode {record.episode}  step {record.t}  action {record.action_name}  "
        f"reward {record.reward:.2f}  value {record.value:.2f}"
    ]
    if algorithm == "shelm":
        lines.append("retrieved: " + " ".join(record.words))
        lines.append("window: " + " ".join(record.window))
    elif algorithm == "helm":
        lines.append(f"most attended word: {record.words[0]} (softmax weight {record.weight:.3f})")
    else:
        lines.append("nearest words: " + ", ".join(record.words))
    step = record.attended["attended_step"]
    where = f"step {step}" if step is not None else "memory before this episode"
    lines.append(
        f"layer {attention_layer} attends most to {where} '{record.attended['attended_word']}' "
        f"({record.attended['attended_weight']:.2f})"
    )
    return lines


class Picture:
    """The frame over its memory strip: frames narrower than MIN_WIDTH are enlarged (nearest neighbour),
    and the strip has a fixed number of lines, so every picture of a run has the same size."""

    MIN_WIDTH, LINES, LINE_HEIGHT, PAD = 480, 6, 15, 6

    def __init__(self, algorithm, attention_layer):
        from PIL import ImageFont

        self.algorithm, self.attention_layer = algorithm, attention_layer
        self.font = ImageFont.load_default(size=12)
        self.lengths = {}  # pixel width of each word drawn so far: the memory repeats its words

    def length(self, text):
        if text not in self.lengths:
            self.lengths[text] = self.font.getlength(text)
        return self.lengths[text]

    def __call__(self, record):
        from PIL import Image, ImageDraw

        frame = record.frame
        scale = -(-self.MIN_WIDTH // frame.shape[1])  # ceil
        frame = frame.repeat(scale, axis=0).repeat(scale, axis=1)
        width = frame.shape[1] + frame.shape[1] % 2  # even sizes, as H.264 needs
        strip = Image.new("RGB", (width, self.LINES * self.LINE_HEIGHT + 2 * self.PAD), (16, 16, 16))
        draw = ImageDraw.Draw(strip)
        lines = self.fit(strip_lines(self.algorithm, record, self.attention_layer), width - 2 * self.PAD)
        for i, line in enumerate(lines):
            draw.text((self.PAD, self.PAD + i * self.LINE_HEIGHT), line, fill=(235, 235, 235), font=self.font)
        top = np.zeros((frame.shape[0] + frame.shape[0] % 2, width, 3), dtype=np.uint8)
        top[: frame.shape[0], : frame.shape[1]] = frame
        return np.concatenate([top, np.asarray(strip)])

    def fit(self, lines, width):
        """Lines broken at spaces to fit `width` pixels, at most LINES of them: a window too long loses
        its oldest words."""
        lines = list(lines)
        while True:
            out = [piece for line in lines for piece in self.wrap(line, width)]
            window = next((i for i, line in enumerate(lines) if line.startswith("window: ")), None)
            if len(out) <= self.LINES or window is None or len(lines[window].split(" ")) <= 3:
                return out[: self.LINES]
            words = lines[window].removeprefix("window: ").removeprefix("... ").split(" ")
            lines[window] = "window: ... " + " ".join(words[1:])

    def wrap(self, line, width):
        """One line broken at spaces into lines of at most `width` pixels."""
        out, current, used = [], "", 0.0
        for word in line.split(" "):
            extra = self.length(" " + word) if current else self.length(word)
            if current and used + extra > width:
                out.append(current)
                current, used = "  " + word, self.length("  " + word)
            else:
                current, used = (current + " " + word if current else word), used + extra
        return out + [current]


def check_video(name, frames):
    """OSError unless the mp4 `name` holds `frames` frames: ffmpeg cut short (a full disk, a file size limit) exits
    without an error that moviepy reports, leaving a truncated file."""
    import imageio_ffmpeg

    try:
        found, _ = imageio_ffmpeg.count_frames_and_secs(name)
    except (RuntimeError, OSError, ValueError) as e:
        raise OSError(f"ffmpeg wrote an unreadable video ({' '.join(str(e).split())[:120]})") from None
    if found != frames:
        raise OSError(f"ffmpeg wrote {found} of {frames} frames")


class Video(Output):
    """One mp4 per episode of env 0: each frame with its memory strip (moviepy, as gymnasium's RecordVideo),
    written by files.write_new: atomically, through no link, never over an existing file (an existing
    episode-001.mp4 leaves the new one episode-001-2.mp4). The folder is checked when the output is made."""

    def __init__(self, out_dir, picture, fps, max_episodes=None, what="--out-dir"):
        self.out_dir, self.picture, self.fps, self.max_episodes = Path(out_dir), picture, fps, max_episodes
        files.output_dir(self.out_dir, what)  # a file, /proc, a read-only folder: one line before playing
        self.frames, self.written = [], []

    def step(self, record):
        if self.max_episodes is None or len(self.written) < self.max_episodes:
            self.frames.append(self.picture(record))

    def end_episode(self, episode):
        if self.frames:
            from moviepy import ImageSequenceClip

            clip, frames = ImageSequenceClip(self.frames, fps=self.fps), len(self.frames)

            def write(name):
                clip.write_videofile(name, logger=None, audio=False)
                check_video(name, frames)

            path = files.write_new(self.out_dir / f"episode-{episode:03d}.mp4", write, by_name=True)
            self.written.append(path)
            print(f"video: {path}")
        self.frames = []

    def close(self):
        self.frames = []  # an episode cut short by the end of the run is not written
