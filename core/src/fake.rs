//! A fake [`Host`] for tests: it keeps the request and response as Envoy would (header maps,
//! body buffers, shared data, counters, properties, replies, callouts) and counts every host
//! call by kind, so tests can state what an exchange costs in host calls. It is plain data with
//! interior mutability, like the wasm host it stands for (whose calls take `&self` too).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};

use crate::headers::{Header, HeaderMap, OwnedHeader};
use crate::host::{Buffer, Callout, CasStore, Host, HostError, Map, SetError, StoreError};

/// A local reply the fake host was asked to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// The fake host.
#[derive(Default)]
pub struct FakeHost {
    /// The clock (Unix ms).
    pub now: Cell<u64>,
    /// The request headers.
    pub request: RefCell<Vec<OwnedHeader>>,
    /// The buffered request body.
    pub request_body: RefCell<Vec<u8>>,
    /// The response headers.
    pub response: RefCell<Vec<OwnedHeader>>,
    /// This callback's response body bytes.
    pub response_chunk: RefCell<Vec<u8>>,
    /// The answer to the last callout: headers (`:status` first) and body.
    pub call_response: RefCell<(Vec<OwnedHeader>, Vec<u8>)>,
    /// Shared data: value and CAS token.
    pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// Properties set.
    pub properties: RefCell<BTreeMap<String, Vec<u8>>>,
    /// Counters and histograms by name; values by id.
    pub metric_names: RefCell<Vec<String>>,
    /// Counter totals by id.
    pub counts: RefCell<HashMap<u32, u64>>,
    /// Histogram samples by id.
    pub samples: RefCell<HashMap<u32, Vec<u64>>>,
    /// Local replies sent.
    pub replies: RefCell<Vec<Reply>>,
    /// Callouts dispatched.
    pub callouts: RefCell<Vec<Callout>>,
    /// The request was resumed (count).
    pub resumed: Cell<u32>,
    /// The route cache was cleared (count).
    pub reroutes: Cell<u32>,
    /// Every host call made, by kind, in order.
    pub calls: RefCell<Vec<&'static str>>,
    /// Make this kind of call fail.
    pub fail: RefCell<Vec<&'static str>>,
}

impl FakeHost {
    /// A fake host at this time with these request headers.
    pub fn new(now_ms: u64, request: &[(&str, &str)]) -> Self {
        let host = Self::default();
        host.now.set(now_ms);
        *host.request.borrow_mut() = pairs(request);
        host
    }

    /// Host calls made since the last [`FakeHost::take_calls`].
    pub fn take_calls(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.calls.borrow_mut())
    }

    /// The value of a counter by its full name (0 when never defined or counted).
    pub fn counter(&self, name: &str) -> u64 {
        let names = self.metric_names.borrow();
        names
            .iter()
            .position(|n| n == name)
            .and_then(|id| self.counts.borrow().get(&(id as u32)).copied())
            .unwrap_or(0)
    }

    /// A request header's first value.
    pub fn request_header(&self, name: &str) -> Option<String> {
        find(&self.request.borrow(), name)
    }

    /// A response header's first value.
    pub fn response_header(&self, name: &str) -> Option<String> {
        find(&self.response.borrow(), name)
    }

    fn call(&self, kind: &'static str) -> Result<(), HostError> {
        self.calls.borrow_mut().push(kind);
        if self.fail.borrow().contains(&kind) {
            return Err(HostError {
                call: kind,
                status: 2,
            });
        }
        Ok(())
    }

    fn map(&self, map: Map) -> &RefCell<Vec<OwnedHeader>> {
        match map {
            Map::Request => &self.request,
            Map::Response => &self.response,
            Map::CallResponse => &self.request, // not used: see `headers`
        }
    }

    fn define(&self, name: &str) -> u32 {
        let mut names = self.metric_names.borrow_mut();
        let id = names.iter().position(|n| n == name).unwrap_or_else(|| {
            names.push(name.to_string());
            names.len() - 1
        });
        u32::try_from(id).unwrap_or(u32::MAX)
    }
}

/// Header pairs from `&str`s.
pub fn pairs(list: &[(&str, &str)]) -> Vec<OwnedHeader> {
    list.iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// Header pairs borrowing `&str`s, for the functions that read a map (`&[Header]`).
pub fn view<'a>(list: &[(&'a str, &'a str)]) -> Vec<Header<'a>> {
    list.iter()
        .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
        .collect()
}

fn find(headers: &[OwnedHeader], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.as_slice() == name.as_bytes())
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

impl CasStore for FakeHost {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.call("get_shared_data").map_err(|_| StoreError)?;
        Ok(self.shared.borrow().get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        self.call("set_shared_data").map_err(|_| SetError::Store)?;
        let mut shared = self.shared.borrow_mut();
        let next = match shared.get(key) {
            // Envoy: a write to a missing key always inserts; otherwise the token must match.
            Some((_, current)) if cas != 0 && cas != *current => return Err(SetError::CasMismatch),
            Some((_, current)) => current.wrapping_add(1),
            None => 1,
        };
        shared.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> Result<u64, HostError> {
        self.call("now")?;
        Ok(self.now.get())
    }

    fn headers(&self, map: Map) -> Result<HeaderMap, HostError> {
        self.call("get_headers")?;
        // In Envoy's wire format, as the filter reads it.
        Ok(match map {
            Map::CallResponse => HeaderMap::from_pairs(&self.call_response.borrow().0),
            map => HeaderMap::from_pairs(&self.map(map).borrow()),
        })
    }

    fn header(&self, map: Map, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        self.call("get_header")?;
        let headers = match map {
            Map::CallResponse => self.call_response.borrow().0.clone(),
            map => self.map(map).borrow().clone(),
        };
        Ok(headers
            .into_iter()
            .find(|(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| v))
    }

    fn set_headers(&self, map: Map, headers: &[Header]) -> Result<(), HostError> {
        self.call("set_headers")?;
        *self.map(map).borrow_mut() = headers
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        Ok(())
    }

    fn replace_header(&self, map: Map, name: &str, value: &str) -> Result<(), HostError> {
        self.call("replace_header")?;
        let mut headers = self.map(map).borrow_mut();
        headers.retain(|(n, _)| n.as_slice() != name.as_bytes());
        headers.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        Ok(())
    }

    fn remove_header(&self, map: Map, name: &[u8]) -> Result<(), HostError> {
        self.call("remove_header")?;
        self.map(map)
            .borrow_mut()
            .retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        Ok(())
    }

    fn body(&self, buffer: Buffer, max: usize) -> Result<Vec<u8>, HostError> {
        self.call("get_body")?;
        let all = match buffer {
            Buffer::Request => self.request_body.borrow().clone(),
            Buffer::Response => self.response_chunk.borrow().clone(),
            Buffer::CallResponse => self.call_response.borrow().1.clone(),
        };
        Ok(all.into_iter().take(max).collect())
    }

    fn replace_body(&self, buffer: Buffer, size: usize, body: &[u8]) -> Result<(), HostError> {
        self.call("replace_body")?;
        let target = match buffer {
            Buffer::Request => &self.request_body,
            Buffer::Response => &self.response_chunk,
            Buffer::CallResponse => return Ok(()),
        };
        let mut data = target.borrow_mut();
        let at = size.min(data.len());
        let keep = data.split_off(at);
        *data = body.to_vec();
        data.extend(keep);
        Ok(())
    }

    fn clear_route_cache(&self) -> Result<(), HostError> {
        self.call("clear_route_cache")?;
        self.reroutes.set(self.reroutes.get() + 1);
        Ok(())
    }

    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.call("set_property")?;
        self.properties
            .borrow_mut()
            .insert(name.to_string(), value.to_vec());
        Ok(())
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        self.call("property")?;
        Ok(self.properties.borrow().get(&path.join(".")).cloned())
    }

    fn dispatch(&self, call: &Callout) -> Result<u32, HostError> {
        self.call("dispatch")?;
        let mut callouts = self.callouts.borrow_mut();
        callouts.push(call.clone());
        Ok(u32::try_from(callouts.len()).unwrap_or(u32::MAX))
    }

    fn resume_request(&self) -> Result<(), HostError> {
        self.call("resume")?;
        self.resumed.set(self.resumed.get() + 1);
        Ok(())
    }

    fn send_reply(
        &self,
        status: u16,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<(), HostError> {
        self.call("send_reply")?;
        self.replies.borrow_mut().push(Reply {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect(),
            body: body.to_vec(),
        });
        Ok(())
    }

    fn reset_request(&self) -> Result<(), HostError> {
        self.call("reset")
    }

    fn define_counter(&self, name: &str) -> Result<u32, HostError> {
        self.call("define_metric")?;
        Ok(self.define(name))
    }

    fn define_histogram(&self, name: &str) -> Result<u32, HostError> {
        self.call("define_metric")?;
        Ok(self.define(name))
    }

    fn increment(&self, id: u32, n: u64) {
        if self.call("increment").is_ok() {
            *self.counts.borrow_mut().entry(id).or_default() += n;
        }
    }

    fn record(&self, id: u32, value: u64) {
        if self.call("record").is_ok() {
            self.samples.borrow_mut().entry(id).or_default().push(value);
        }
    }
}
