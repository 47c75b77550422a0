"""Run with the Open-Sora environment's interpreter: the server's conditioning plan against Open-Sora
v1.3's own VAE functions, for the seed's condition_frames. Prints one line per cf, "ROW " and
JSON (Open-Sora prints on stdout too):

    python check_latents.py OPENSORA_CHECKOUT TINY_VAE_FOLDER SERVERS_FOLDER

- prefix4: the latents `vae.encode` gives for the frames the server uses;
- opensora: the latents Open-Sora's own `collect_references_batch` gives for a cf-frame reference
  video (it truncates, then encodes);
- the generated 49 frames: `vae.get_latent_size` (and, to show why it cannot map cf, its value
  for cf frames itself).
"""

import json
import os
import sys
import tempfile

opensora, vae_folder, servers = sys.argv[1:4]
sys.path[:0] = [opensora, servers]

import av  # noqa: E402
import numpy as np  # noqa: E402
import opensora_v1_3 as server  # noqa: E402
import torch  # noqa: E402
from opensora.models.vae_v1_3.vae import OpenSoraVAE_V1_3_Pipline  # noqa: E402
from opensora.utils.inference_utils import collect_references_batch  # noqa: E402

torch.manual_seed(0)
vae = OpenSoraVAE_V1_3_Pipline.from_pretrained(vae_folder).eval()
vae.micro_batch_size = vae.encoder.micro_batch_size = vae.decoder.micro_batch_size = 1
vae.micro_frame_size, vae.normalization, vae.temporal_overlap = 17, "video", True
size = 32
folder = tempfile.mkdtemp()
with torch.no_grad():
    for cf in (5, 11, 17, 22, 28):
        row = {"cf": cf, "get_latent_size_of_cf": int(vae.get_latent_size((cf, size, size))[0])}
        for mode in ("prefix4", "opensora"):
            used, latents = server.condition_plan(cf, mode, vae.micro_frame_size, vae.temporal_overlap)
            row[mode] = {"used": used, "latents": latents}
        used = row["prefix4"]["used"]
        row["prefix4"]["encode"] = int(vae.encode(torch.rand(1, 3, used, size, size) * 2 - 1).shape[2])
        path = os.path.join(folder, f"ref{cf}.mp4")
        with av.open(path, "w") as container:
            stream = container.add_stream("mpeg4", rate=24)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for _ in range(cf):
                frame = np.random.default_rng(cf).integers(0, 255, (size, size, 3), dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        refs = collect_references_batch([path], vae, (size, size))
        row["opensora"]["collect_references_batch"] = int(refs[0][0].shape[1])
        row["generated_49"] = {"frames": server.generated_frames(49),
                               "get_latent_size": int(vae.get_latent_size((49, size, size))[0])}
        print("ROW " + json.dumps(row), flush=True)
