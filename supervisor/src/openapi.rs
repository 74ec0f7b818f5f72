//! docs/api/flintd.yaml as data: its routes, and a validator of JSON answers against its schemas (the subset of
//! OpenAPI 3.0 the document uses: `type`, `properties`, `required`, `items`, `nullable`, `enum`,
//! `additionalProperties`, `$ref`). The unit tests check the document against the router and typed answers; the
//! end-to-end suite checks live answers of a running flintd against it.
use serde_json::Value;

/// The document, parsed.
pub struct Spec {
    pub doc: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not valid YAML: {why}")]
    Yaml { path: String, why: String },
}

impl Spec {
    pub fn load(path: &std::path::Path) -> Result<Spec, SpecError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read { path: p.clone(), source })?;
        let doc: Value = serde_yaml::from_str(&text).map_err(|e| SpecError::Yaml { path: p, why: e.to_string() })?;
        Ok(Spec { doc })
    }

    /// The document of this repository.
    pub fn repo() -> Result<Spec, SpecError> {
        Spec::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api/flintd.yaml"))
    }

    /// Every (method, path) the document describes.
    pub fn routes(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (path, item) in self.doc["paths"].as_object().into_iter().flatten() {
            for m in ["get", "post", "put", "delete"] {
                if item.get(m).is_some() {
                    out.push((m.to_string(), path.clone()));
                }
            }
        }
        out.sort();
        out
    }

    /// The schema of a route's answer with `status` (JSON content), if the document gives one.
    pub fn response_schema(&self, method: &str, path: &str, status: u16) -> Option<&Value> {
        let r = &self.doc["paths"][path][method]["responses"][status.to_string()];
        let r = self.resolve(r);
        r.get("content")?.get("application/json")?.get("schema")
    }

    /// A named schema of `components/schemas`.
    pub fn schema(&self, name: &str) -> &Value {
        &self.doc["components"]["schemas"][name]
    }

    fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let mut at = &self.doc;
                for part in r.trim_start_matches("#/").split('/') {
                    at = &at[part];
                }
                at
            }
            None => v,
        }
    }

    /// Every `$ref` in the document that names nothing.
    pub fn dangling_refs(&self) -> Vec<String> {
        fn walk(spec: &Spec, v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                        if spec.resolve(v).is_null() {
                            out.push(r.to_string());
                        }
                    }
                    m.values().for_each(|x| walk(spec, x, out));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(spec, x, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(self, &self.doc, &mut out);
        out
    }

    /// What is wrong with `value` against `schema` (empty: it conforms). Paths in the messages are JSON pointers.
    pub fn check(&self, schema: &Value, value: &Value) -> Vec<String> {
        let mut out = Vec::new();
        self.check_at(schema, value, "", &mut out);
        out
    }

    fn check_at(&self, schema: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if v.is_null() {
            if !schema["nullable"].as_bool().unwrap_or(false) && schema.get("type").is_some() {
                out.push(format!("{at}: null, but the schema is not nullable"));
            }
            return;
        }
        let ty = schema["type"].as_str().unwrap_or("");
        let ok = match ty {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
        if !ok {
            out.push(format!("{at}: {v} is not of type {ty}"));
            return;
        }
        if let Some(allowed) = schema["enum"].as_array() {
            if !allowed.contains(v) {
                out.push(format!("{at}: {v} is not one of {allowed:?}"));
            }
        }
        if let (Some(items), Some(a)) = (schema.get("items"), v.as_array()) {
            for (i, x) in a.iter().enumerate() {
                self.check_at(items, x, &format!("{at}/{i}"), out);
            }
        }
        let Some(obj) = v.as_object() else { return };
        for r in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !obj.contains_key(r) {
                out.push(format!("{at}: the required property `{r}` is missing"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, x) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => self.check_at(s, x, &format!("{at}/{k}"), out),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => out.push(format!("{at}: `{k}` is not in the schema")),
                    Some(s @ Value::Object(_)) => self.check_at(s, x, &format!("{at}/{k}"), out),
                    _ => {}
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_parses_and_its_refs_resolve() {
        let spec = Spec::repo().unwrap();
        assert_eq!(spec.dangling_refs(), Vec::<String>::new());
        let mut served: Vec<(String, String)> =
            crate::api::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        served.sort();
        assert_eq!(spec.routes(), served, "docs/api/flintd.yaml documents exactly the routes the router serves");
    }

    #[test]
    fn the_validator_finds_what_is_wrong() {
        let spec = Spec::repo().unwrap();
        let health = spec.schema("Health");
        let good = serde_json::json!(
            {"status": "ok", "version": "1", "vms": 0, "sessions": 0, "s3": false, "host": "h", "cross_host": "off"}
        );
        assert_eq!(spec.check(health, &good), Vec::<String>::new());
        let bad = serde_json::json!({"status": "bad", "version": 1, "vms": 0, "s3": false, "host": "h", "x": 1});
        let e = spec.check(health, &bad).join("\n");
        for want in ["/status", "/version", "`sessions` is missing", "`x` is not in the schema"] {
            assert!(e.contains(want), "{want} not in {e}");
        }
    }
}
