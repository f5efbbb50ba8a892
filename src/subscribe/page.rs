//! The live page (SPEC §7): the files a browser gets from the subscribe server's plain `GET`s.
//!
//! Owns: the page (`web/index.html`) and the vendored uPlot chart library
//! (`web/vendor/uplot/`), embedded into the binary at build time, and the answer for each of
//! them: content type, `Cache-Control`, and the headers that keep a browser from guessing
//! (`nosniff`) or framing the page elsewhere. Paths: `/` and `/index.html` for the page,
//! `/vendor/uPlot.iife.min.js`, `/vendor/uPlot.min.css` and `/vendor/uPlot.LICENSE.txt`
//! beside it. The page refers to the
//! vendored files relatively, so it works under whatever path prefix a proxy serves it at.
//! A relay with tokens (SPEC §8): the page takes one from its own `?token=` or its Token field,
//! keeps it in the tab's sessionStorage (never localStorage) and sends it as `?token=` on its
//! WebSocket (a browser cannot set the header); the page never displays it.
//! History (SPEC §9): the page's socket asks `?format=json` (envelopes, so it knows each
//! message's id), `last=1` on the first connection to a path (the latest retained value on
//! open) and `since=ID` after a reconnect (the id of the last message it received); it turns
//! an envelope back into the text or binary message and shows a gap frame as what was missed.
//! The page also shows the relay's Redis state beside its connection state: it asks
//! `healthz` every 5 s on its socket's base (same origin only, so also behind a proxy's path
//! prefix) and never shows a green "live" while that answers 503.
//! Must not: read files at run time, reach the network (no CDN), or hold any state: what the
//! page shows comes from the relay's WebSocket like any other subscriber's, and from the
//! relay's own `/healthz`. Routing by role (only the subscribe server serves the page) is
//! `http`'s job.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

/// The uPlot release in `web/vendor/uplot/`; the page's links carry it as `?v=` so a browser
/// that cached an older copy fetches the new one.
#[cfg(test)]
const UPLOT_VERSION: &str = "1.6.32";

const INDEX: &str = include_str!("../../web/index.html");
const UPLOT_JS: &str = include_str!("../../web/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../web/vendor/uplot/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../../web/vendor/uplot/LICENSE");

/// Who may run what on the page: its own inline script and the vendored library, WebSockets
/// to anywhere (the relay may sit on another host: `?ws=`), nothing else.
const CSP: &str = "default-src 'none'; script-src 'self' 'unsafe-inline'; \
    style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self' ws: wss:; \
    base-uri 'none'; form-action 'self'; frame-ancestors 'self'";

/// One embedded file and how it is served.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    cache_control: &'static str,
}

fn asset(path: &str) -> Option<Asset> {
    Some(match path {
        // The page itself is revalidated every time, so a relay upgrade shows at once.
        "/" | "/index.html" => Asset {
            body: INDEX,
            content_type: "text/html; charset=utf-8",
            cache_control: "no-cache",
        },
        // Versioned by the page's `?v=`: a day in caches is safe.
        "/vendor/uPlot.iife.min.js" => Asset {
            body: UPLOT_JS,
            content_type: "text/javascript; charset=utf-8",
            cache_control: "public, max-age=86400",
        },
        "/vendor/uPlot.min.css" => Asset {
            body: UPLOT_CSS,
            content_type: "text/css; charset=utf-8",
            cache_control: "public, max-age=86400",
        },
        // The page's footer links uPlot's MIT licence, which goes wherever the binary goes.
        "/vendor/uPlot.LICENSE.txt" => Asset {
            body: UPLOT_LICENSE,
            content_type: "text/plain; charset=utf-8",
            cache_control: "public, max-age=86400",
        },
        _ => return None,
    })
}

/// The answer to a plain `GET` (or `HEAD`) of `path`, if `path` is one of the page's files.
pub fn serve(path: &str) -> Option<Response<Full<Bytes>>> {
    let asset = asset(path)?;
    let mut response = Response::new(Full::new(Bytes::from_static(asset.body.as_bytes())));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(asset.cache_control),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if asset.content_type.starts_with("text/html") {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_links_the_vendored_version() {
        assert!(
            UPLOT_JS.starts_with(&format!(
                "/*! https://github.com/leeoniya/uPlot (v{UPLOT_VERSION}) */"
            )),
            "web/vendor/uplot/uPlot.iife.min.js is not uPlot {UPLOT_VERSION}"
        );
        for file in ["uPlot.iife.min.js", "uPlot.min.css"] {
            let link = format!("\"vendor/{file}?v={UPLOT_VERSION}\"");
            assert!(INDEX.contains(&link), "web/index.html lacks {link}");
        }
        let readme = include_str!("../../web/vendor/uplot/README.md");
        assert!(readme.contains(&format!("uPlot {UPLOT_VERSION}")));
    }

    #[test]
    fn only_the_pages_files_are_served() {
        for path in [
            "/",
            "/index.html",
            "/vendor/uPlot.iife.min.js",
            "/vendor/uPlot.min.css",
            "/vendor/uPlot.LICENSE.txt",
        ] {
            let response = serve(path).unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert!(response.headers().contains_key(header::CACHE_CONTROL));
        }
        for path in [
            "/office",
            "/vendor/",
            "/vendor/uplot/LICENSE",
            "//",
            "/index.htm",
        ] {
            assert!(serve(path).is_none(), "{path} must not be a page file");
        }
    }
}
