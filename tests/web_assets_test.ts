import assert from "node:assert/strict";
import {
  contentTypeOf,
  generateAssetsModule,
  readWebFiles,
  renderAssetsModule,
} from "../scripts/embed_web.ts";
import { CONTENT_SECURITY_POLICY, mountWeb, webRoutes } from "../routes/web.ts";
import { createApp } from "../routes/app.ts";
import { AudioService } from "../lib/service.ts";
import { WEB_ASSETS } from "../web/assets.ts";
import { tempDir } from "./audio_util.ts";

Deno.test("web/assets.ts is up to date with the files in web/", async () => {
  const want = await generateAssetsModule();
  const have = await Deno.readTextFile(new URL("../web/assets.ts", import.meta.url));
  assert.ok(
    have === want,
    "web/assets.ts is stale: run `deno task embed` " +
      "(deno run --allow-read --allow-write scripts/embed_web.ts)",
  );
  // And it holds every file of the page.
  const files = await readWebFiles();
  assert.deepEqual(Object.keys(WEB_ASSETS), files.map((f) => f.path));
  for (const f of files) assert.equal(WEB_ASSETS[f.path]?.body, f.text, f.path);
});

Deno.test("the embedded module round-trips any text exactly", async () => {
  await using dir = await tempDir();
  const tricky = "quotes \" ' ` ${x} \\ back\\slash </script> \u2028 \u2029 \0 tab\t crlf\r\n ☃ 🎧";
  const files = [
    { path: "/a.js", text: tricky },
    { path: "/b/index.html", text: "<p>x</p>\n" },
    { path: "/empty.css", text: "" },
  ];
  const text = await renderAssetsModule(files);
  assert.equal(await renderAssetsModule(files), text, "deterministic");
  const path = `${dir.path}/assets.ts`;
  await Deno.writeTextFile(path, text);
  const mod = await import(`file://${path}`);
  for (const f of files) {
    assert.equal(mod.WEB_ASSETS[f.path].body, f.text);
    assert.equal(mod.WEB_ASSETS[f.path].contentType, contentTypeOf(f.path));
    assert.match(mod.WEB_ASSETS[f.path].etag, /^"[0-9a-f]{32}"$/);
  }
  assert.notEqual(mod.WEB_ASSETS["/a.js"].etag, mod.WEB_ASSETS["/empty.css"].etag);
});

Deno.test("the embed script refuses files it cannot serve", async () => {
  assert.throws(() => contentTypeOf("/logo.png"), RangeError);
  assert.throws(() => contentTypeOf("/Makefile"), RangeError);
  assert.equal(contentTypeOf("/X.JS"), "text/javascript; charset=utf-8");
  await using dir = await tempDir();
  await Deno.writeFile(`${dir.path}/bad.js`, new Uint8Array([0x61, 0xff, 0xfe]));
  await assert.rejects(readWebFiles(new URL(`file://${dir.path}/`)), TypeError);
  await Deno.remove(`${dir.path}/bad.js`);
  await Deno.writeTextFile(`${dir.path}/.hidden.png`, "skipped");
  await Deno.writeTextFile(`${dir.path}/assets.ts`, "skipped: the generated module");
  await Deno.mkdir(`${dir.path}/sub`);
  await Deno.writeTextFile(`${dir.path}/sub/x.css`, "p{}");
  await Deno.writeTextFile(`${dir.path}/index.html`, "<p>");
  const files = await readWebFiles(new URL(`file://${dir.path}/`));
  assert.deepEqual(files, [{ path: "/index.html", text: "<p>" }, {
    path: "/sub/x.css",
    text: "p{}",
  }]);
});

Deno.test("the page is served with no-cache, an ETag and a strict Content-Security-Policy", async () => {
  const app = webRoutes();
  const res = await app.request("/");
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("Content-Type"), "text/html; charset=utf-8");
  assert.equal(await res.text(), WEB_ASSETS["/index.html"]!.body);
  assert.equal(res.headers.get("Cache-Control"), "no-cache");
  assert.equal(res.headers.get("X-Content-Type-Options"), "nosniff");
  const csp = res.headers.get("Content-Security-Policy") ?? "";
  assert.equal(csp, CONTENT_SECURITY_POLICY);
  assert.match(csp, /(^|; )default-src 'none'(;|$)/);
  assert.match(csp, /(^|; )connect-src 'self' ws: wss:(;|$)/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval|\*|https?:/);
  const etag = res.headers.get("ETag");
  assert.equal(etag, WEB_ASSETS["/index.html"]!.etag);

  for (const [path, asset] of Object.entries(WEB_ASSETS)) {
    const r = await app.request(path);
    assert.equal(r.status, 200, path);
    assert.equal(r.headers.get("Content-Type"), asset.contentType, path);
    assert.equal(r.headers.get("Content-Security-Policy"), CONTENT_SECURITY_POLICY, path);
    assert.equal(await r.text(), asset.body, path);
  }
  assert.equal(
    (await app.request("/app.js")).headers.get("Content-Type"),
    "text/javascript; charset=utf-8",
  );

  // Revalidation: unchanged → 304 without a body.
  const again = await app.request("/", { headers: { "If-None-Match": etag! } });
  assert.equal(again.status, 304);
  assert.equal(await again.text(), "");
  assert.equal(again.headers.get("ETag"), etag);
  const stale = await app.request("/", { headers: { "If-None-Match": '"0"' } });
  assert.equal(stale.status, 200);
  await stale.body?.cancel();

  const head = await app.request("/app.js", { method: "HEAD" });
  assert.equal(head.status, 200);
  assert.equal(await head.text(), "");

  const missing = await app.request("/nope.js");
  assert.equal(missing.status, 404);
  await missing.body?.cancel();
});

Deno.test("the page loads nothing from elsewhere and every file it names is embedded", () => {
  const html = WEB_ASSETS["/index.html"]!.body;
  const refs = [...html.matchAll(/\s(?:src|href)="([^"]*)"/g)].map((m) => m[1]!);
  assert.ok(refs.length >= 3, refs.join(" "));
  for (const ref of refs) {
    assert.doesNotMatch(ref, /^[a-z]+:|^\/\//i, `external reference ${ref}`);
    assert.ok(WEB_ASSETS[`/${ref.replace(/^\.?\//, "")}`], `${ref} is embedded`);
  }
  const js = WEB_ASSETS["/app.js"]!.body;
  const modules = [...js.matchAll(/addModule\("([^"]+)"\)/g)].map((m) => m[1]!);
  assert.ok(modules.length >= 1);
  for (const m of modules) assert.ok(WEB_ASSETS[`/${m}`], `${m} is embedded`);
  assert.doesNotMatch(js, /^\s*import\s/m, "no imports: the page is one module");
  for (const [path, asset] of Object.entries(WEB_ASSETS)) {
    assert.doesNotMatch(asset.body, /url\(\s*["']?(https?:)?\/\//, `${path} loads a remote url()`);
    assert.doesNotMatch(asset.body, /fetch\(\s*["'`]https?:/, `${path} fetches a remote URL`);
  }
});

Deno.test("mounted on the app, the page needs no token while the API still does", async () => {
  await using service = new AudioService({ capture: null, playback: null });
  const app = createApp(service, { token: "secret" });
  mountWeb(app);
  const page = await app.request("/");
  assert.equal(page.status, 200);
  assert.equal(await page.text(), WEB_ASSETS["/index.html"]!.body);
  assert.equal(page.headers.get("Content-Security-Policy"), CONTENT_SECURITY_POLICY);
  const worklet = await app.request("/audio-worklet.js");
  assert.equal(worklet.status, 200);
  await worklet.body?.cancel();
  const api = await app.request("/api/audio");
  assert.equal(api.status, 401);
  await api.body?.cancel();
  const authed = await app.request("/api/audio", { headers: { Authorization: "Bearer secret" } });
  assert.equal(authed.status, 200);
  await authed.body?.cancel();
  const missing = await app.request("/missing.js");
  assert.equal(missing.status, 404);
  assert.match(missing.headers.get("Content-Type") ?? "", /json/, "the app's own 404");
  await missing.body?.cancel();
});
