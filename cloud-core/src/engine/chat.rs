//! Chat prompts: the checkpoint's own chat template (`tokenizer_config.json`), rendered
//! with minijinja (Python-compatible string methods from minijinja-contrib), and the stop
//! tokens of `generation_config.json`.
//!
//! As in transformers' `apply_chat_template`, the rendered text already holds the special
//! tokens it needs (BOS and the like), so it is tokenized without adding them again.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

/// Chat template errors, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// A file is unreadable or malformed.
    #[error("{file}: {reason}")]
    File {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The template failed to render (including its own `raise_exception`).
    #[error("chat template: {0}")]
    Render(String),
}

/// One chat message.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A checkpoint's chat template.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        // AddedToken objects: {"content": "<｜begin▁of▁sentence｜>", ...}
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

fn read_json(file: &Path) -> Result<Option<Value>, ChatError> {
    if !file.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(file).map_err(|e| ChatError::File {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ChatError::File {
            file: file.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })
}

impl ChatTemplate {
    /// The template of a checkpoint directory, if its `tokenizer_config.json` has one.
    pub fn load(dir: &Path) -> Result<Option<ChatTemplate>, ChatError> {
        let file = dir.join("tokenizer_config.json");
        let Some(cfg) = read_json(&file)? else {
            return Ok(None);
        };
        let source = match cfg.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            // A list of named templates: use "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string)
                .ok_or_else(|| ChatError::File {
                    file: file.clone(),
                    reason: "chat_template: no template named \"default\"".into(),
                })?,
            Some(_) => {
                return Err(ChatError::File {
                    file,
                    reason: "chat_template must be a string or a list".into(),
                })
            }
        };
        Ok(Some(ChatTemplate {
            source,
            bos_token: token_text(cfg.get("bos_token")),
            eos_token: token_text(cfg.get("eos_token")),
        }))
    }

    /// A template from its source (tests, custom deployments).
    pub fn from_source(source: &str, bos_token: &str, eos_token: &str) -> ChatTemplate {
        ChatTemplate {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        }
    }

    /// Renders the conversation; with `add_generation_prompt`, ends where the assistant's
    /// answer begins.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let tmpl = env
            .template_from_str(&self.source)
            .map_err(|e| ChatError::Render(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages.iter().map(|m| minijinja::context! { role => m.role.clone(), content => m.content.clone() }).collect::<Vec<minijinja::Value>>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        })
        .map_err(|e| ChatError::Render(e.to_string()))
    }
}

/// End-of-sequence ids from `generation_config.json` (integer or list), if present.
pub fn generation_eos(dir: &Path) -> Result<Vec<u32>, ChatError> {
    let file = dir.join("generation_config.json");
    let Some(cfg) = read_json(&file)? else {
        return Ok(Vec::new());
    };
    super::config::token_ids(cfg.get("eos_token_id")).ok_or_else(|| ChatError::File {
        file: file.clone(),
        reason: "eos_token_id must be a token id or a list of them".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of DeepSeek-V2-Chat's published template.
    const DEEPSEEK_V2: &str = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_a_deepseek_conversation() {
        let t = ChatTemplate::from_source(
            DEEPSEEK_V2,
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
        );
        let out = t
            .render(
                &[
                    msg("system", "You diagnose machines."),
                    msg("user", "Vibration 7 mm/s?"),
                    msg("assistant", "Bearing wear."),
                    msg("user", "Action?"),
                ],
                true,
            )
            .expect("render");
        assert_eq!(
            out,
            "<｜begin▁of▁sentence｜>You diagnose machines.\n\nUser: Vibration 7 mm/s?\n\nAssistant: Bearing wear.<｜end▁of▁sentence｜>User: Action?\n\nAssistant:"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = ChatTemplate::from_source(
            "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}{{ m.content.strip().split('</think>')[-1] }}|{% endfor %}",
            "",
            "",
        );
        assert_eq!(
            t.render(&[msg("user", "  a</think>b  ")], false)
                .expect("render"),
            "b|"
        );
        let e = t.render(&[msg("tool", "x")], false).expect_err("raise");
        assert!(e.to_string().contains("bad role tool"), "{e}");
    }

    #[test]
    fn loads_from_tokenizer_config_with_added_token_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"})
            .to_string(),
        )
        .expect("write");
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [7, 9]}"#,
        )
        .expect("write");
        let t = ChatTemplate::load(dir.path())
            .expect("load")
            .expect("template");
        assert_eq!(
            t.render(&[msg("user", "hi")], true).expect("render"),
            "<s>hi</s>"
        );
        assert_eq!(generation_eos(dir.path()).expect("eos"), vec![7, 9]);
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": "x"}"#,
        )
        .expect("write");
        assert!(generation_eos(dir.path())
            .expect_err("bad")
            .to_string()
            .contains("generation_config.json"));
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(ChatTemplate::load(empty.path()).expect("none").is_none());
    }
}
