'use strict';
// Taxon browser page. Plain DOM code: the binary embeds this file as is, so
// there is no build step and no dependency to vendor. The server's CSP forbids
// inline scripts and style attributes, so styles are set through CSSOM only.

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, props = {}, ...kids) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('data-') || k.startsWith('aria-')) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const kid of kids) if (kid != null) node.append(kid);
  return node;
};
const enc = encodeURIComponent;
const plural = (n, word, many = `${word}s`) => `${n} ${n === 1 ? word : many}`;
// A model identity carries a full sha256: show its start (the whole one goes in a tooltip).
const shortModel = (m) => m.replace(/(sha256:[0-9a-f]{12})[0-9a-f]+/, '$1…');
const pct = (p) => `${Math.round((p ?? 0) * 100)}%`;
const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));
const MIN_EXAMPLES = 5;

const state = {
  info: null,     // /v1/info, refetched when tenant or token changes
  queue: [],      // [{file, url}] waiting for upload
  learnGen: 0,    // a newer enroll cancels the older "is it trained yet" poll
  classifyGen: 0, // only the latest classify may paint the result
  previewUrl: null,
};

// Private browsing can make localStorage throw; the page still works unsaved.
const load = (key, fallback) => { try { return localStorage.getItem(key) ?? fallback; } catch { return fallback; } };
const save = (key, value) => { try { localStorage.setItem(key, value); } catch { /* not kept */ } };
const tenant = () => $('#tenant').value.trim() || 'default';
const token = () => $('#token').value.trim();

// ---------- errors ----------
class ApiError extends Error {
  constructor(code, message, status = 0) {
    super(message);
    this.code = code;
    this.status = status;
  }
  // Client-side problems and the server-down sentence read better without a code.
  display() { return this.code ? `${this.code}: ${this.message}` : this.message; }
}
const problem = (message) => new ApiError('', message);

function showError(err) {
  const box = $('#error');
  box.textContent = err instanceof ApiError ? err.display() : String(err?.message ?? err);
  box.hidden = false;
}

function clearError() { $('#error').textContent = ''; $('#error').hidden = true; }
const setBusy = (node, busy) => (busy ? node.setAttribute('aria-busy', 'true') : node.removeAttribute('aria-busy'));

// ---------- API ----------

async function api(method, path, { body, json, scoped = true } = {}) {
  const headers = {};
  if (scoped) {
    headers['X-Tenant'] = tenant();
    if (token()) headers.Authorization = `Bearer ${token()}`;
  }
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  }
  let res;
  try {
    res = await fetch(path, { method, headers, body, cache: 'no-store' });
  } catch {
    throw problem(`Cannot reach the server at ${location.origin}: is the head-trainer running?`);
  }
  const text = await res.text().catch(() => '');
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!res.ok) {
    // A proxy in front may answer with HTML; still say something useful.
    throw new ApiError(data?.code || `HTTP_${res.status}`,
      data?.message || text.trim().slice(0, 300) || res.statusText || 'request failed', res.status);
  }
  return data ?? {};
}

async function loadInfo() {
  state.info = null;
  state.info = await api('GET', '/v1/info');
  $('#token-hint').textContent = state.info.tokens
    ? 'This server checks tokens.' : 'This server does not check tokens.';
}

// ---------- readiness ----------
let readyBusy = false;
let wasReady = null; // null until the first answer, so start-up does not load twice

async function checkReady() {
  if (readyBusy) return; // a hung server must not stack up checks
  readyBusy = true;
  const out = $('#ready');
  try {
    const r = await api('GET', '/readyz', { scoped: false });
    const model = r.model ?? 'unknown';
    out.textContent = `Ready — model ${shortModel(model)}`;
    out.title = model;
    out.dataset.state = 'ready';
    // The server came up after the page did: load what failed at start.
    if (wasReady === false) {
      if (!state.info) loadInfo().catch(() => {});
      refreshClasses().catch(() => {});
    }
    wasReady = true;
  } catch (err) {
    out.textContent = `Not ready: ${err.message}`;
    out.dataset.state = 'down';
    wasReady = false;
  } finally {
    readyBusy = false;
  }
}

// ---------- files ----------
function wireDrop(zone, input, onFiles) {
  zone.addEventListener('click', () => input.click());
  zone.addEventListener('keydown', (e) => {
    if (e.key !== 'Enter' && e.key !== ' ') return;
    e.preventDefault(); // Space would otherwise scroll the page.
    input.click();
  });
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    const files = [...(e.dataTransfer?.files ?? [])];
    if (files.length) onFiles(files);
  });
  input.addEventListener('change', () => {
    const files = [...input.files];
    input.value = ''; // so choosing the same file again still fires "change"
    if (files.length) onFiles(files);
  });
}

const fmtBytes = (n) => (n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MB`
  : n >= 1 << 10 ? `${Math.round(n / 1024)} KB` : `${n} bytes`);

// Checked here so a big photo fails at once instead of after a long upload.
function tooBig(files) {
  const max = state.info?.max_photo_bytes;
  const big = max ? files.filter((f) => f.size > max) : [];
  if (!big.length) return null;
  const names = big.map((f) => `${f.name} (${fmtBytes(f.size)})`).join(', ');
  return Object.assign(problem(`Photo too big: ${names}. The server accepts at most ${fmtBytes(max)} per photo.`), { files: big });
}

// ---------- enroll ----------
function addToQueue(files) {
  clearError();
  const big = tooBig(files);
  if (big) showError(big);
  for (const file of files) {
    if (big?.files.includes(file)) continue;
    state.queue.push({ file, url: file.type.startsWith('image/') ? URL.createObjectURL(file) : null });
  }
  renderQueue();
}

function dropFromQueue(items) {
  for (const item of items) if (item.url) URL.revokeObjectURL(item.url);
  state.queue = state.queue.filter((q) => !items.includes(q));
  renderQueue();
}

function renderQueue() {
  $('#enroll-queue').replaceChildren(...state.queue.map((item) => {
    const name = item.file.name || 'photo';
    const thumb = item.url
      ? el('img', { src: item.url, alt: name })
      : el('span', { class: 'nothumb', text: (name.split('.').pop() || '?').slice(0, 4) });
    const drop = el('button', { type: 'button', class: 'unqueue', text: '×', title: `Remove ${name}`, 'aria-label': `Remove ${name} from the queue` });
    drop.addEventListener('click', () => dropFromQueue([item]));
    return el('li', { class: 'queued', title: `${name} — ${fmtBytes(item.file.size)}` }, thumb, drop);
  }));
  const n = state.queue.length;
  const total = state.queue.reduce((s, q) => s + q.file.size, 0);
  $('#enroll-count').textContent = n ? `${plural(n, 'photo')} queued (${fmtBytes(total)}).` : 'No photos queued.';
  $('#enroll-clear').hidden = n === 0;
}

async function enroll(e) {
  e.preventDefault();
  clearError();
  const name = $('#class-name').value.trim();
  const parent = $('#class-parent').value.trim();
  const status = $('#enroll-status');
  const rejectedList = $('#enroll-rejected');
  const button = $('#enroll-button');
  const items = [...state.queue];
  if (!state.info) await loadInfo().catch(() => {});
  const max = state.info?.max_photos_per_enroll;
  const why = !name ? ['Enter a class name first.', '#class-name']
    : !items.length ? ['Queue some photos first: drop them, choose them, or take them with the camera.', '#enroll-drop']
    : max && items.length > max ? [`At most ${max} photos per upload: remove ${items.length - max} from the queue.`, '#enroll-queue']
    : null;
  const big = tooBig(items.map((i) => i.file));
  if (why || big) {
    showError(big || problem(why[0]));
    if (why) $(why[1]).focus();
    return;
  }
  button.disabled = true;
  setBusy(status, true);
  state.learnGen++;
  rejectedList.replaceChildren();
  status.textContent = `Uploading ${plural(items.length, 'photo')} to ${name}…`;
  try {
    const form = new FormData();
    for (const { file } of items) form.append('photos', file, file.name || 'photo.jpg');
    const r = await api('POST', `/v1/classes/${enc(name)}/photos${parent ? `?parent=${enc(parent)}` : ''}`, { body: form });
    // "examples" stays plural even for 1: people and tests look for that word.
    const cached = r.cached ? `, ${r.cached} already known` : '';
    status.replaceChildren(
      el('span', { class: 'done', text: `Added ${plural(r.accepted ?? 0, 'photo')} to ${r.class ?? name} (${r.examples} examples${cached}) — head ${r.head} v${r.head_version}` }),
      el('span', { class: 'learned' }));
    const rejected = r.rejected ?? [];
    rejectedList.replaceChildren(...rejected.map((x) => el('li', { title: x.code || '', text: `${x.file}: ${x.message}` })));
    rejectedList.hidden = !rejected.length;
    dropFromQueue(items);
    refreshClasses().catch(() => {});
    watchTraining(r.head, r.head_version);
  } catch (err) {
    showError(err);
    rejectedList.hidden = true;
    status.textContent = 'Nothing was added.'; // the queue stays, to retry or fix
  } finally {
    setBusy(status, false);
    button.disabled = false;
  }
}

// The prototype head answers right after an enroll; a trained head replaces it
// in the background. Poll so the person sees the learning happen.
async function watchTraining(head, version) {
  const gen = state.learnGen;
  const line = $('#enroll-status .learned');
  const say = (text, mood) => { line.textContent = text; line.dataset.state = mood; };
  if (head !== 'prototype' || state.info?.default_head === 'prototype') {
    say(`learned: ${head} head v${version} live`, 'live');
    return;
  }
  const target = state.info?.default_head || 'trained';
  say(`Training the ${target} head… the prototype head answers meanwhile.`, 'training');
  for (const started = Date.now(); Date.now() - started < 30000;) {
    await sleep(1000);
    if (gen !== state.learnGen) return;
    let r;
    try { r = await api('GET', '/v1/classes'); } catch { continue; }
    if (gen !== state.learnGen) return;
    renderTree(r);
    if (r.head && r.head !== 'prototype' && (r.head_version ?? 0) > version) {
      say(`learned: ${r.head} head v${r.head_version} live`, 'live');
      return;
    }
  }
  say(`The ${target} head is not live after 30 s; the prototype head v${version} keeps answering. Refresh the class list to check later.`, 'slow');
}

// ---------- classify ----------
function bar(name, probability, top = false) {
  const fill = el('span', { class: 'bar-fill' });
  fill.style.width = `${Math.max(0, Math.min(100, (probability ?? 0) * 100)).toFixed(1)}%`;
  const row = el('li', { class: 'bar', 'data-name': name },
    el('span', { class: 'bar-name', text: name }),
    el('span', { class: 'bar-track', 'aria-hidden': 'true' }, fill),
    el('span', { class: 'bar-pct', text: pct(probability) }));
  if (top) row.dataset.top = 'true';
  return row;
}

function paintResult(decision, label, words, children = [], parent = null, meta = '') {
  const badge = $('#result-decision');
  badge.textContent = decision;
  badge.toggleAttribute('data-decision', !!decision);
  if (decision) badge.dataset.decision = decision;
  $('#result').dataset.state = decision || 'error';
  $('#result-label').textContent = label;
  $('#result-label-row').hidden = !label;
  $('#result-words').textContent = words;
  $('#result-meta').textContent = meta;
  $('#result-children-title').hidden = !children.length;
  $('#result-children').replaceChildren(...children.map((c) => bar(c.name, c.probability, decision === 'child' && c.name === label)));
  $('#result-parent').replaceChildren(...(parent?.name
    ? [el('span', { class: 'sub', text: 'Parent' }), el('ul', { class: 'bars' }, bar(parent.name, parent.probability))]
    : []));
}

async function classify(file) {
  clearError();
  const big = tooBig([file]);
  if (big) { showError(big); return; }
  const result = $('#result');
  const gen = ++state.classifyGen;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  const preview = $('#classify-preview');
  // A file the browser cannot show (not an image): no broken-image icon, the error says why.
  preview.hidden = false;
  preview.onerror = () => { preview.hidden = true; };
  preview.src = state.previewUrl;
  result.dataset.empty = 'false';
  setBusy(result, true);
  $('#result-words').textContent = 'Looking…';
  try {
    const form = new FormData();
    form.append('photo', file, file.name || 'photo.jpg');
    const r = await api('POST', '/v1/classify?top_k=5', { body: form });
    if (gen !== state.classifyGen) return;
    const decision = r.decision || 'unknown';
    const label = r.label ?? '';
    const words = decision === 'parent' ? `Not sure which ${label} — parent: ${label}`
      : decision === 'unknown' ? 'Unknown: matches none of your classes' : label;
    const meta = [];
    if (typeof r.similarity === 'number') meta.push(`similarity ${r.similarity.toFixed(2)}`);
    if (r.head) meta.push(`answered by the ${r.head} head v${r.head_version ?? '?'}`);
    paintResult(decision, label, words, r.children ?? [], r.parent, meta.join(' · '));
  } catch (err) {
    if (gen !== state.classifyGen) return;
    showError(err);
    paintResult('', '', 'No answer: see the error above.');
  } finally {
    if (gen === state.classifyGen) setBusy(result, false);
  }
}

// ---------- taxonomy tree ----------
async function refreshClasses() {
  try {
    renderTree(await api('GET', '/v1/classes'));
  } catch (err) {
    $('#tree-summary').textContent = `Could not load the classes: ${err.display ? err.display() : err}`;
    throw err;
  }
}

function renderTree(data) {
  const classes = data.classes ?? [];
  const kids = new Map();
  const roots = [];
  const names = new Set(classes.map((c) => c.name));
  for (const c of classes) {
    // Parents are listed by the server; should one be missing, show its child at the top.
    if (!c.parent || !names.has(c.parent)) { roots.push(c); continue; }
    if (!kids.has(c.parent)) kids.set(c.parent, []);
    kids.get(c.parent).push(c);
  }
  const byName = (a, b) => a.name.localeCompare(b.name);
  const node = (c) => {
    const children = (kids.get(c.name) ?? []).sort(byName);
    return el('li', {}, classRow(c, children.length), children.length ? el('ul', {}, ...children.map(node)) : null);
  };
  const tree = $('#tree');
  tree.replaceChildren(...roots.sort(byName).map(node));
  if (!classes.length) tree.append(el('li', { class: 'empty', text: 'No classes yet: teach one above.' }));

  const leaves = classes.filter((c) => !c.is_parent);
  const few = leaves.filter((c) => (c.examples ?? 0) < MIN_EXAMPLES).length;
  const parts = [`${plural(leaves.length, 'class', 'classes')}, ${plural(leaves.reduce((s, c) => s + (c.examples ?? 0), 0), 'example')}`];
  if (few) parts.push(`${few} with fewer than ${MIN_EXAMPLES} photos`);
  parts.push(data.head ? `serving the ${data.head} head v${data.head_version ?? '?'}` : 'no head trained yet');
  if (data.model) parts.push(`model ${shortModel(data.model)}`);
  $('#tree-summary').textContent = parts.join(' · ');
  $('#parent-names').replaceChildren(...classes.filter((c) => c.is_parent).map((c) => el('option', { value: c.name })));
}

function classRow(c, childCount) {
  const examples = c.examples ?? 0;
  const isParent = c.is_parent || childCount > 0;
  const info = el('div', { class: 'node-info' },
    el('span', { class: 'name', text: c.name }),
    el('span', { class: 'count', text: plural(examples, 'example') }),
    isParent ? el('span', { class: 'tag', text: `parent of ${childCount}` }) : null,
    !isParent && examples < MIN_EXAMPLES ? el('span', { class: 'few', text: `few examples: add at least ${MIN_EXAMPLES} photos` }) : null);
  const button = (cls, text, label, onClick) => {
    const b = el('button', { type: 'button', class: `${cls} small`, text, 'aria-label': label });
    b.addEventListener('click', onClick);
    return b;
  };
  const row = el('div', { class: 'node', 'data-class': c.name });
  row.append(info, el('div', { class: 'node-actions' },
    button('rename secondary', 'Rename', `Rename ${c.name}`, () => startRename(row, c.name)),
    button('remove danger', 'Remove', `Remove ${c.name}`, () => removeClass(c.name, examples))));
  return row;
}

function startRename(row, oldName) {
  clearError();
  const input = el('input', { type: 'text', class: 'rename-input', value: oldName, 'aria-label': `New name for ${oldName}` });
  const saveBtn = el('button', { type: 'button', class: 'rename-save small primary', text: 'Save' });
  const cancel = el('button', { type: 'button', class: 'rename-cancel small secondary', text: 'Cancel' });
  const form = el('div', { class: 'rename-form' }, input, saveBtn, cancel);
  const parts = [$('.node-info', row), $('.node-actions', row)];
  parts.forEach((p) => { p.hidden = true; });
  row.prepend(form);
  const close = () => { form.remove(); parts.forEach((p) => { p.hidden = false; }); $('.rename', row).focus(); };
  const commit = async () => {
    const newName = input.value.trim();
    if (!newName || newName === oldName) { close(); return; }
    clearError();
    saveBtn.disabled = true;
    try {
      const r = await api('POST', `/v1/classes/${enc(oldName)}/rename`, { json: { new_name: newName } });
      $('#tree-status').textContent = `Renamed ${oldName} to ${newName} — head ${r.head ?? 'none'} v${r.head_version ?? '?'}`;
      for (const id of ['#class-name', '#class-parent']) if ($(id).value.trim() === oldName) $(id).value = newName;
      await refreshClasses().catch(() => {});
    } catch (err) {
      showError(err); // keep the input open so the name can be fixed
      saveBtn.disabled = false;
      input.focus();
    }
  };
  saveBtn.addEventListener('click', commit);
  cancel.addEventListener('click', close);
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === 'Escape') { e.preventDefault(); (e.key === 'Enter' ? commit : close)(); }
  });
  input.focus(); input.select();
}

async function removeClass(name, examples) {
  clearError();
  if (!confirm(`Remove the class "${name}" and its ${plural(examples, 'example')}?`)) return;
  const path = `/v1/classes/${enc(name)}`;
  let r;
  try {
    r = await api('DELETE', path);
  } catch (err) {
    showError(err);
    // FAILED_PRECONDITION (409): the class still has children. Offer the recursive remove.
    if (err.code !== 'FAILED_PRECONDITION' || !confirm(`${err.message}\n\nRemove "${name}" together with all its children?`)) return;
    clearError();
    try { r = await api('DELETE', `${path}?recursive=true`); } catch (err2) { showError(err2); return; }
  }
  $('#tree-status').textContent = `Removed ${(r.classes ?? [name]).join(', ')} (${plural(r.examples ?? 0, 'example')}) — head ${r.head ?? 'none'} v${r.head_version ?? '?'}`;
  await refreshClasses().catch(() => {});
}

// ---------- start ----------
function init() {
  $('#tenant').value = load('taxon.tenant', 'default');
  $('#token').value = load('taxon.token', '');
  // Save on every keystroke, but reload data only once an edit is finished.
  for (const id of ['#tenant', '#token']) {
    $(id).addEventListener('input', () => save(`taxon.${id.slice(1)}`, $(id).value.trim()));
    $(id).addEventListener('change', () => { clearError(); loadInfo().catch(showError); refreshClasses().catch(() => {}); });
  }
  $('#settings').addEventListener('submit', (e) => e.preventDefault());

  wireDrop($('#enroll-drop'), $('#enroll-files'), addToQueue);
  wireDrop($('#classify-drop'), $('#classify-file'), (files) => classify(files[0]));
  $('#enroll-form').addEventListener('submit', enroll);
  $('#enroll-clear').addEventListener('click', () => { dropFromQueue([...state.queue]); $('#enroll-drop').focus(); });
  $('#tree-refresh').addEventListener('click', () => { clearError(); refreshClasses().catch(showError); });

  const cams = [
    makeCamera($('#enroll-camera'), $('#enroll-webcam'), (f) => addToQueue([f])),
    makeCamera($('#classify-camera'), $('#classify-webcam'), (f) => classify(f)),
  ];
  // A camera left running in a background tab keeps its light on.
  document.addEventListener('visibilitychange', () => { if (document.hidden) cams.forEach((c) => c.stop()); });
  window.addEventListener('pagehide', () => cams.forEach((c) => c.stop()));
  // A file dropped outside a zone would navigate away and lose the queue.
  window.addEventListener('dragover', (e) => e.preventDefault());
  window.addEventListener('drop', (e) => e.preventDefault());

  renderQueue();
  checkReady();
  setInterval(checkReady, 5000);
  loadInfo().catch(() => {});
  refreshClasses().catch(() => {});
}

init();
