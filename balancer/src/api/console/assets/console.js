// allot console: the little script the pages use. No inline script anywhere (CSP
// `default-src 'self'`); this file is served by the balancer itself.
"use strict";

// Every error the page meets (script errors, rejected promises, CSP violations) is kept for
// this tab in sessionStorage, so the end-to-end test can read them after navigating.
(function collectErrors() {
  function keep(text) {
    try {
      const errors = JSON.parse(sessionStorage.getItem("allot-errors") || "[]");
      errors.push(String(text));
      sessionStorage.setItem("allot-errors", JSON.stringify(errors.slice(-50)));
    } catch (_) { /* storage unavailable: nothing to keep */ }
  }
  window.addEventListener("error", (e) => keep("error: " + (e.message || e.type)));
  window.addEventListener("unhandledrejection", (e) => keep("rejection: " + e.reason));
  document.addEventListener("securitypolicyviolation", (e) =>
    keep("csp: " + e.violatedDirective + " " + e.blockedURI));
})();

// Forms that change something important ask first (the server insists on the checkbox too).
function confirmations() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (e) => {
      if (!window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  }
}

// A live region refreshes itself from the URL in its data-live attribute.
function liveRegions() {
  for (const region of document.querySelectorAll("[data-live]")) {
    const every = Number(region.dataset.every || 5000);
    const refresh = async () => {
      try {
        const r = await fetch(region.dataset.live, { credentials: "same-origin", cache: "no-store" });
        if (r.ok) {
          region.innerHTML = await r.text();
          region.dataset.refreshedAt = String(Date.now());
        } else if (r.status === 401) {
          window.location.assign("/login");
        }
      } catch (_) { /* the balancer is restarting: try again next time */ }
    };
    window.setInterval(refresh, every);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  confirmations();
  liveRegions();
});
