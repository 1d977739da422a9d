"""The exploration page at `/`: search by text, uploaded image or image URL, filters (safe mode on by default),
a results grid with "more like this", and subset export as parquet. Plain HTML and JavaScript against the
service's own API, so everything the page does a script can do too."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>laion_assets search</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #fafafa; color: #222; }
 header { padding: 12px 16px; background: #fff; border-bottom: 1px solid #ddd; }
 header form { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; }
 input[type=text] { width: 28em; padding: 5px; }
 input[type=number] { width: 5em; }
 fieldset { border: 1px solid #ddd; display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; }
 #status { padding: 6px 16px; color: #555; min-height: 1.3em; }
 #status.error { color: #b00; }
 #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 12px;
            padding: 12px 16px; }
 .result { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 13px; }
 .result img { width: 100%; height: 180px; object-fit: contain; background: #eee; }
 .result .caption { margin: 4px 0; overflow-wrap: anywhere; }
 .result .meta { color: #666; }
</style>
</head>
<body>
<header>
<form id="query">
 <label>Index <select id="indice"></select></label>
 <input type="text" id="text" placeholder="Search by text">
 <label>or image <input type="file" id="file" accept="image/*"></label>
 <input type="text" id="image-url" placeholder="or image URL" style="width: 16em">
 <label>search <select id="modality"><option value="image">images</option>
  <option value="text">captions</option></select></label>
 <label>results <input type="number" id="num" value="40" min="1" max="10000"></label>
 <button type="submit" id="search">Search</button>
 <fieldset>
  <legend>Filters</legend>
  <label><input type="checkbox" id="safe" checked> safe mode</label>
  <label>punsafe &le; <input type="number" id="punsafe" value="0.5" min="0" max="1" step="0.05"></label>
  <label>pwatermark &le; <input type="number" id="pwatermark" value="1" min="0" max="1" step="0.05"></label>
  <label>language <input type="text" id="language" placeholder="any" style="width: 4em"></label>
  <label>min width <input type="number" id="min-width" value="0" min="0"></label>
  <label>min height <input type="number" id="min-height" value="0" min="0"></label>
  <label>aesthetic &ge; <input type="number" id="min-aesthetic" placeholder="any" min="0" max="10" step="0.5"
   style="width: 4em"></label>
  <label><input type="checkbox" id="dedup" checked> dedup</label>
 </fieldset>
 <fieldset>
  <legend>Export (img2dataset parquet)</legend>
  <button type="button" id="export-results">these results</button>
  <button type="button" id="export-filter">whole index with these filters</button>
 </fieldset>
</form>
</header>
<div id="status"></div>
<div id="results"></div>
<script>
const $ = (id) => document.getElementById(id);
let lastQuery = null, lastResults = [];

function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

function filters() {
  const f = {min_width: parseInt($("min-width").value || "0"), min_height: parseInt($("min-height").value || "0")};
  if ($("safe").checked) f.max_punsafe = parseFloat($("punsafe").value);
  const wm = parseFloat($("pwatermark").value);
  if (wm < 1) f.max_pwatermark = wm;
  if ($("language").value.trim()) f.language = $("language").value.trim();
  if ($("min-aesthetic").value.trim()) f.min_aesthetic = parseFloat($("min-aesthetic").value);
  return f;
}

async function post(path, doc) {
  const r = await fetch(path, {method: "POST", body: JSON.stringify(doc)});
  if (!r.ok) { let m = r.statusText; try { m = (await r.json()).error; } catch (e) {} throw new Error(m); }
  return r;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",")[1]);
    reader.onerror = reject;
    reader.readAsDataURL(file);
  });
}

async function currentQuery() {
  if ($("file").files.length) return {image: await readFile($("file").files[0])};
  if ($("image-url").value.trim()) return {image_url: $("image-url").value.trim()};
  return {text: $("text").value};
}

async function search(query) {
  try {
    lastQuery = query || await currentQuery();
    const num = parseInt($("num").value || "40");
    const doc = {...lastQuery, indice_name: $("indice").value, modality: $("modality").value, num_images: num,
                 num_result_ids: Math.min(10000, num * 3), deduplicate: $("dedup").checked,
                 use_safety_model: $("safe").checked, ...filters()};
    status("searching...");
    lastResults = await (await post("/knn-service", doc)).json();
    render(lastResults);
    status(`${lastResults.length} results`);
  } catch (e) { status(e.message, true); }
}

function render(results) {
  const grid = $("results");
  grid.innerHTML = "";
  grid.dataset.renders = (+grid.dataset.renders || 0) + 1;  // lets a script wait for this search's results
  for (const r of results) {
    const card = document.createElement("div");
    card.className = "result";
    card.dataset.key = r.key; card.dataset.id = r.id; card.dataset.punsafe = r.punsafe;
    const img = document.createElement("img");
    img.src = `/image/${encodeURIComponent($("indice").value)}/${encodeURIComponent(r.id)}`;
    img.onerror = () => { if (img.src !== r.url) img.src = r.url; };  // not in our shards: the original URL
    img.alt = r.caption || "";
    const caption = document.createElement("div"); caption.className = "caption"; caption.textContent = r.caption;
    const info = document.createElement("div"); info.className = "meta";
    info.textContent = `similarity ${r.similarity.toFixed(3)} · ${r.WIDTH}x${r.HEIGHT} · ${r.LANGUAGE}` +
                       ` · punsafe ${Number(r.punsafe).toFixed(2)} · pwatermark ${Number(r.pwatermark).toFixed(2)}` +
                       (r.aesthetic == null ? "" : ` · aesthetic ${Number(r.aesthetic).toFixed(2)}`);
    const link = document.createElement("a"); link.href = r.url; link.textContent = "link"; link.target = "_blank";
    link.rel = "noopener noreferrer";
    const more = document.createElement("button"); more.type = "button"; more.className = "more";
    more.textContent = "more like this";
    more.onclick = () => moreLikeThis(r);
    card.append(img, caption, info, link, " ", more);
    grid.append(card);
  }
}

async function moreLikeThis(r) {
  // The stored image when we have it, else its original URL (fetched by the service through its guard).
  const stored = await fetch(`/image/${encodeURIComponent($("indice").value)}/${encodeURIComponent(r.id)}`);
  if (stored.ok) {
    const bytes = new Uint8Array(await stored.arrayBuffer());
    let bin = "";
    for (let i = 0; i < bytes.length; i += 8192) bin += String.fromCharCode(...bytes.subarray(i, i + 8192));
    return search({image: btoa(bin)});
  }
  return search({image_url: r.url});
}

async function exportSubset(current) {
  try {
    const doc = {indice_name: $("indice").value};
    if (current) doc.ids = lastResults.map((r) => r.id); else doc.filter = filters();
    status("exporting...");
    const r = await post("/export", doc);
    const name = (r.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(await r.blob());
    a.download = name ? name[1] : "subset.parquet";
    document.body.append(a); a.click(); a.remove();
    status(`exported ${r.headers.get("X-Rows")} rows`);
  } catch (e) { status(e.message, true); }
}

// Listeners set here, not inline: an inline handler's scope includes the form's named controls (#search).
$("query").addEventListener("submit", (event) => { event.preventDefault(); search(); });
$("export-results").addEventListener("click", () => exportSubset(true));
$("export-filter").addEventListener("click", () => exportSubset(false));
const refilters = ["safe", "punsafe", "pwatermark", "language", "min-width", "min-height", "min-aesthetic", "dedup",
                   "indice", "modality"];
for (const id of refilters) {
  $(id).addEventListener("change", () => { if (lastQuery) search(lastQuery); });
}

(async () => {
  const names = await (await fetch("/indices-list")).json();
  for (const n of names) {
    const o = document.createElement("option"); o.value = o.textContent = n; $("indice").append(o);
  }
  status(names.length ? "" : "no index is available: build one first", !names.length);
})();
</script>
</body>
</html>
"""
