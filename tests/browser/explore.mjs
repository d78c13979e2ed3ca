// Open a notebook in JupyterLab (headless Chromium), run all cells, click the explorer's Generate button
// and report the highlighted tokens as JSON on stdout. Used by tests/test_browser.py.
// usage: node explore.mjs <chromium> <notebook url with token> <screenshot.png> [timeout_ms]
import { chromium } from "playwright-core";

const [executablePath, url, shot, timeoutArg] = process.argv.slice(2);
const timeout = Number(timeoutArg || 480000);
const log = (...a) => console.error(`[explore ${new Date().toISOString().slice(11, 19)}]`, ...a);

const browser = await chromium.launch({
  executablePath, headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 2000 } });
try {
  page.setDefaultTimeout(timeout);
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));

  await page.goto(url);
  await page.locator(".jp-Notebook .jp-Cell").first().waitFor();
  // run all only once the kernel is up: cells sent while it connects can be dropped
  await page.locator(".jp-StatusBar-Widget", { hasText: /Idle/ }).first().waitFor();
  log("notebook open, kernel idle");
  const firstPrompt = page.locator(".jp-CodeCell .jp-InputPrompt").first();
  for (let attempt = 1; ; attempt++) {
    await page.locator(".lm-MenuBar-itemLabel", { hasText: /^Run$/ }).click();
    await page.locator(".lm-Menu-itemLabel", { hasText: /^Run All Cells$/ }).click();
    log(`run all (attempt ${attempt})`);
    try {
      await page.waitForFunction((el) => /\[(\*|\d+)\]/.test(el.textContent), await firstPrompt.elementHandle(),
                                 { timeout: 30000 });
      break;
    } catch (e) {
      if (attempt === 3) throw e;
    }
  }

  const button = page.locator(".jupyter-widgets button", { hasText: "Generate" }).first();
  await button.waitFor({ state: "visible" });
  await page.locator(".saealign-status", { hasText: "scored" }).first().waitFor();
  log("explorer shown and scored");
  await button.scrollIntoViewIfNeeded();
  await button.click();
  const result = page.locator(".saealign-result").first();
  await result.locator(".sa-tok").first().waitFor();
  await page.locator(".saealign-status", { hasText: "generated in" }).first().waitFor();
  log("tokens highlighted");

  const readTokens = () => result.locator(".sa-tok").evaluateAll((els) => els.map((e) => ({
    column: e.closest("[data-column]").dataset.column,
    text: e.textContent,
    contamination: e.dataset.contamination,
    calibrated: e.dataset.calibrated,
    attribution: e.dataset.attribution,
    background: getComputedStyle(e).backgroundColor,
    title: e.title,
  })));
  const legendMode = () => result.locator(".sa-legend").first().getAttribute("data-mode");
  const tokens = await readTokens();
  const modes = { [await legendMode()]: tokens };
  const area0 = page.locator(".jp-OutputArea-output", { has: result }).first();
  await area0.scrollIntoViewIfNeeded();
  await area0.screenshot({ path: shot.replace(/\.png$/, "-calibrated.png") });
  // the colour toggle: recolour by steer attribution, then back
  await page.locator(".widget-toggle-buttons button", { hasText: "steer attribution" }).first().click();
  await page.waitForFunction(() => document.querySelector(".saealign-result .sa-legend")?.dataset.mode === "attribution");
  modes[await legendMode()] = await readTokens();
  await area0.screenshot({ path: shot.replace(/\.png$/, "-attribution.png") });
  log("toggled to attribution");
  await page.locator(".widget-toggle-buttons button", { hasText: "contamination vs. reference" }).first().click();
  await page.waitForFunction(() => document.querySelector(".saealign-result .sa-legend")?.dataset.mode === "calibrated");
  await result.locator(".sa-tok").first().hover();
  const status = await page.locator(".saealign-status").first().innerText();
  const chart = await page.locator(".saealign-chart svg").count();
  const inspectorRows = await page.locator(".saealign-inspector tr[data-latent]").count();
  // live rescoring: another topic in the dropdown re-ranks the latents in the inspector
  const firstLatent = () => page.locator(".saealign-inspector tr[data-latent]").first().getAttribute("data-latent");
  const seaTop = await firstLatent();
  await page.locator("select", { has: page.locator("option", { hasText: /^food$/ }) }).first().selectOption({ label: "food" });
  await page.waitForFunction((before) => {
    const row = document.querySelector(".saealign-inspector tr[data-latent]");
    return row && row.dataset.latent !== before;
  }, seaTop);
  const foodTop = await firstLatent();
  const texts = await page.locator(".jupyter-widgets textarea").first().inputValue();
  log("rescored for food");
  const area = page.locator(".jp-OutputArea-output", { has: page.locator(".saealign-result") }).first();
  await area.scrollIntoViewIfNeeded();
  await area.screenshot({ path: shot });
  console.log(JSON.stringify({ tokens, modes, status, chart, inspectorRows, seaTop, foodTop, texts, pageErrors }));
} catch (e) {
  await page.screenshot({ path: shot.replace(/\.png$/, "-failure.png") }).catch(() => {});
  throw e;
} finally {
  await browser.close();
}
