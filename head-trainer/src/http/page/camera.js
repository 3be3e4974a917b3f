'use strict';
// The camera, for both the enroll queue and classify: a live preview, frames taken as JPEG
// files. Loaded before app.js, whose helpers ($, el, showError, problem) it calls only once
// the page runs.

let activeCamera = null; // one stream at a time: phones often refuse a second

function makeCamera(panel, startBtn, onShot) {
  const video = $('video', panel);
  let stream = null;
  const cam = {
    async start() {
      clearError();
      if (stream) return;
      if (!navigator.mediaDevices?.getUserMedia) {
        showError(problem('This browser gives no camera access here; the camera needs HTTPS or localhost.'));
        return;
      }
      activeCamera?.stop();
      try {
        stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: { ideal: 'environment' } }, audio: false });
      } catch (err) {
        const known = { NotAllowedError: 'Camera permission was denied.', NotFoundError: 'No camera was found.', NotReadableError: 'The camera is in use by another program.' };
        showError(problem(known[err.name] || `The camera could not start (${err.name || err}).`));
        return;
      }
      activeCamera = cam;
      video.srcObject = stream;
      panel.hidden = false;
      Object.assign(startBtn, { textContent: 'Camera on', disabled: true });
      await video.play().catch(() => {});
      $('.take', panel).focus();
    },
    stop() {
      stream?.getTracks().forEach((t) => t.stop());
      stream = null;
      video.srcObject = null;
      panel.hidden = true;
      Object.assign(startBtn, { textContent: 'Use camera', disabled: false });
      if (activeCamera === cam) activeCamera = null;
    },
    async shoot() {
      if (!stream || !video.videoWidth) return;
      // Cap the size: the feature model needs far fewer pixels than a phone gives.
      const scale = Math.min(1, 1600 / Math.max(video.videoWidth, video.videoHeight));
      const canvas = el('canvas', { width: Math.round(video.videoWidth * scale), height: Math.round(video.videoHeight * scale) });
      canvas.getContext('2d').drawImage(video, 0, 0, canvas.width, canvas.height);
      const blob = await new Promise((ok) => canvas.toBlob(ok, 'image/jpeg', 0.9));
      const stamp = new Date().toISOString().replace(/[:.]/g, '-');
      if (blob) onShot(new File([blob], `camera-${stamp}.jpg`, { type: 'image/jpeg' }));
    },
  };
  startBtn.addEventListener('click', () => cam.start());
  $('.stop', panel).addEventListener('click', () => { cam.stop(); startBtn.focus(); });
  $('.take', panel).addEventListener('click', () => cam.shoot());
  return cam;
}
