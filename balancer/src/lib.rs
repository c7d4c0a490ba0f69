//! allot's central balancer: the books ([`store`]), the admin API ([`api`]), authentication
//! ([`auth`]), the schedule ([`schedule`]) and the admin CLI ([`cli`]).
#![forbid(unsafe_code)]

pub mod store;
